"""The tokenizer of a Hugging Face model directory, as an mmjax `Tokenizer`.

A `tokenizer.json` may carry fixed padding and truncation settings (the real
all-MiniLM-L6-v2 pads every text to 128 tokens); they are switched off here,
since mmjax's `encode` adds the special tokens, pads and builds the mask itself.
"""
from __future__ import annotations

import pathlib

import numpy as np
import tokenizers

from mmjax.data.errors import DataError
from mmjax.data.tokenizer import Tokenizer, load_tokenizer


class CausalTokenizer(Tokenizer):
  """GPT-2-style vocabularies (no [CLS]): text is encoded as is, padded with <|endoftext|>."""

  def __init__(self, hf: tokenizers.Tokenizer, source: str = '<memory>'):
    eos = hf.token_to_id('<|endoftext|>')
    if eos is None:
      raise DataError(f'{source}: tokenizer has neither a [CLS]-like token nor <|endoftext|>')
    self.hf = hf
    self.cls_id, self.sep_id, self.pad_id = None, eos, eos
    self.mask_id, self.unk_id = None, None
    self.vocab_size = hf.get_vocab_size(with_added_tokens=True)

  def encode(self, texts, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids truncated to `max_len`, right-padded; mask 1 on real tokens."""
    if isinstance(texts, str):
      texts = [texts]
    ids = np.full((len(texts), max_len), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    for row, enc in enumerate(self.hf.encode_batch(list(texts), add_special_tokens=False)):
      tokens = enc.ids[:max_len]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask


def hf_tokenizer(directory) -> Tokenizer | None:
  """The directory's tokenizer, or None when it has no tokenizer files."""
  directory = pathlib.Path(directory)
  path = directory / 'tokenizer.json'
  if not path.is_file():
    return load_tokenizer(directory) if (directory / 'vocab.txt').is_file() else None
  hf = tokenizers.Tokenizer.from_file(str(path))
  hf.no_padding()
  hf.no_truncation()
  try:
    return Tokenizer(hf, str(directory))
  except DataError:
    return CausalTokenizer(hf, str(directory))
