"""Text to token ids: a thin wrapper over a Hugging Face `tokenizers.Tokenizer`.

Sequences are `BOS tokens EOS` padded to a fixed length. The ids of the special
tokens are found by name: BERT-style ([CLS] ... [SEP]) and RoBERTa-style (<s> ... </s>)
vocabularies give a `Tokenizer`; a GPT-2 byte-level BPE (tokenizer.json, or
vocab.json + merges.txt), which has only <|endoftext|>, gives a `CausalTokenizer`
with that token as BOS, EOS and padding. Both say `bos_id` / `eos_id`, which
generation starts and stops with.
"""

import logging
import os
import pathlib
import re

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from mmjax.data import cache
from mmjax.data import sources as sources_lib
from mmjax.data.errors import DataError

ENDOFTEXT = '<|endoftext|>'  # GPT-2's one special token
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')  # ids 0..4 when we train
_CANDIDATES = {  # role -> names tried in order
    'pad': ('[PAD]', '<pad>'),
    'unk': ('[UNK]', '<unk>'),
    'cls': ('[CLS]', '<s>', '<|startoftext|>'),
    'sep': ('[SEP]', '</s>', '<|endoftext|>'),
    'mask': ('[MASK]', '<mask>'),
}


class Tokenizer:
  """`encode(texts, max_len) -> (ids, mask)`, both int32 [N, max_len].

  `mask_id` and `unk_id` are None for vocabularies without those tokens (e.g.
  CLIP's); a vocabulary without a pad token pads with its [SEP] token (CLIP
  pads with <|endoftext|>), which is harmless since the mask marks padding.
  """

  def __init__(self, hf: tokenizers.Tokenizer, source: str = '<memory>'):
    self.hf = hf
    ids = {role: next((hf.token_to_id(n) for n in names if hf.token_to_id(n) is not None), None)
           for role, names in _CANDIDATES.items()}
    missing = [role for role in ('cls', 'sep') if ids[role] is None]
    if missing:
      raise DataError(f'{source}: tokenizer has no ' + ' or '.join(
          f'{role} token (tried {", ".join(_CANDIDATES[role])})' for role in missing))
    self.cls_id, self.sep_id = ids['cls'], ids['sep']
    self.pad_id = ids['pad'] if ids['pad'] is not None else ids['sep']
    self.mask_id, self.unk_id = ids['mask'], ids['unk']
    self.vocab_size = hf.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int:
    """What a generated text starts after ([CLS]): a decoder's first input."""
    return self.cls_id

  @property
  def eos_id(self) -> int:
    """What ends a text ([SEP]): a decoder stops when it generates it."""
    return self.sep_id

  def prompt_ids(self, text: str, whole: bool = False) -> list[int]:
    """`BOS tokens` of `text`, unpadded: a prompt to continue; `whole`: `BOS tokens EOS`,
    a finished text such as the question a prefix-LM answers (data.prefix_field)."""
    ids = [self.bos_id] + self.hf.encode(text, add_special_tokens=False).ids
    return ids + [self.eos_id] if whole else ids

  def encode(self, texts, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] tokens [SEP]`, truncated so that [SEP] stays last, padded with pad_id."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    return self._pack(self.hf.encode_batch(texts, add_special_tokens=False), max_len)

  def _pack(self, encodings, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    if max_len < 2:
      raise DataError(f'max_len={max_len}: need room for [CLS] and [SEP]')
    ids = np.full((len(encodings), max_len), self.pad_id, np.int32)
    mask = np.zeros((len(encodings), max_len), np.int32)
    for row, enc in enumerate(encodings):
      tokens = [self.cls_id] + enc.ids[:max_len - 2] + [self.sep_id]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask

  def encode_word_labels(self, texts, word_labels, max_len: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`encode(texts, max_len)` plus token labels int32 [N, max_len] for token classification.

    `word_labels[i]` holds one int per whitespace word of `texts[i]` (`str.split()`).
    A word's label goes on its first token; its other tokens (sub-words, or the
    "," split off "circle,"), [CLS], [SEP] and padding get -1, as do the words
    that truncation cut off. Tokens find their word by character offsets: the
    encodings' `word_ids` count the pre-tokenizer's words, and BERT's splits
    punctuation into words of its own, so they do not index whitespace words.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    encodings = self.hf.encode_batch(texts, add_special_tokens=False)
    ids, mask = self._pack(encodings, max_len)
    labels = np.full(ids.shape, -1, np.int32)
    for row, (text, enc, word_label) in enumerate(zip(texts, encodings, word_labels)):
      word_of_char = _whitespace_words(text)
      if len(word_label) != word_of_char.max(initial=-1) + 1:
        raise DataError(f'text {text!r} has {word_of_char.max(initial=-1) + 1} words but '
                        f'{len(word_label)} word labels')
      previous = -1
      for pos, (start, end) in enumerate(enc.offsets[:max_len - 2]):
        word = word_of_char[end - 1] if end > start else -1   # the last char skips a leading space
        if word > previous:
          labels[row, pos + 1] = word_label[word]               # +1: after [CLS]
          previous = word
    return ids, mask, labels

  def decode(self, ids):
    """int ids [L] -> str, or [N, L] -> list[str]; special tokens and padding dropped."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
      return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)
    return [self.decode(row) for row in ids]

  def save(self, directory) -> pathlib.Path:
    path = pathlib.Path(directory) / 'tokenizer.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'tokenizer.json.tmp{os.getpid()}')
    self.hf.save(str(tmp))
    os.replace(tmp, path)  # a reader never sees a half-written file
    return path


class CausalTokenizer(Tokenizer):
  """A GPT-2 vocabulary (no [CLS]): <|endoftext|> is BOS, EOS and padding (the mask marks
  padding, so it is never read as a token); no [MASK] or [UNK] (byte-level BPE spells any
  text)."""

  def __init__(self, hf: tokenizers.Tokenizer, source: str = '<memory>'):
    eos = hf.token_to_id(ENDOFTEXT)
    if eos is None:
      raise DataError(f'{source}: tokenizer has neither a [CLS]-like token '
                      f'({", ".join(_CANDIDATES["cls"])}) nor {ENDOFTEXT}')
    self.hf = hf
    self.cls_id = self.sep_id = self.pad_id = eos
    self.mask_id, self.unk_id = None, None
    self.vocab_size = hf.get_vocab_size(with_added_tokens=True)

  def _pack(self, encodings, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`<|endoftext|> tokens <|endoftext|>` cut to `max_len`: a text cut short keeps no
    EOS, so a language model learns to stop only where texts end."""
    if max_len < 2:
      raise DataError(f'max_len={max_len}: need room for {ENDOFTEXT} and a token')
    ids = np.full((len(encodings), max_len), self.pad_id, np.int32)
    mask = np.zeros((len(encodings), max_len), np.int32)
    for row, enc in enumerate(encodings):
      tokens = ([self.bos_id] + enc.ids + [self.eos_id])[:max_len]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask


def from_hf(hf: tokenizers.Tokenizer, source: str = '<memory>') -> Tokenizer:
  """A `Tokenizer` for a vocabulary with [CLS]-like tokens, else a `CausalTokenizer`.

  Padding and truncation settings saved in a tokenizer.json (all-MiniLM-L6-v2 pads every
  text to 128 tokens) are switched off: `encode` pads and builds the mask itself."""
  hf.no_padding()
  hf.no_truncation()
  has_cls = any(hf.token_to_id(n) is not None for n in _CANDIDATES['cls'])
  if not has_cls and hf.token_to_id(ENDOFTEXT) is not None:
    return CausalTokenizer(hf, source)
  return Tokenizer(hf, source)


def _byte_level_bpe(directory: pathlib.Path) -> tokenizers.Tokenizer:
  """GPT-2's tokenizer from its vocab.json + merges.txt (what tokenizer.json would hold)."""
  try:
    model = models.BPE.from_file(str(directory / 'vocab.json'), str(directory / 'merges.txt'))
  except Exception as e:  # tokenizers raises its own bare Exception on a bad file
    raise DataError(f'{directory}: vocab.json / merges.txt are not a BPE vocabulary ({e})'
                    ) from None
  hf = tokenizers.Tokenizer(model)
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  if hf.token_to_id(ENDOFTEXT) is not None:
    hf.add_special_tokens([ENDOFTEXT])   # matched whole in text, dropped by decode
  return hf


def _whitespace_words(text: str) -> np.ndarray:
  """int [len(text)]: the index of the `str.split()` word each character is in, -1 on spaces."""
  word_of_char = np.full(len(text), -1)
  for i, match in enumerate(re.finditer(r'\S+', text)):
    word_of_char[match.start():match.end()] = i
  return word_of_char


def _bert_pipeline(model) -> tokenizers.Tokenizer:
  hf = tokenizers.Tokenizer(model)
  hf.normalizer = normalizers.BertNormalizer(lowercase=True)
  hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  hf.decoder = decoders.WordPiece()
  return hf


def _read_json_tokenizer(path: pathlib.Path) -> tokenizers.Tokenizer:
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises its own bare Exception on a bad file
    raise DataError(f'{path}: not a Hugging Face tokenizer.json ({e})') from None


def load_tokenizer(path) -> Tokenizer:
  """A local Hugging Face tokenizer: a tokenizer.json (file or in the folder), else a
  BERT vocab.txt, else GPT-2's vocab.json + merges.txt."""
  path = pathlib.Path(path).expanduser()
  if path.is_file() and path.suffix == '.json':
    return from_hf(_read_json_tokenizer(path), str(path))
  if (path / 'tokenizer.json').is_file():
    return from_hf(_read_json_tokenizer(path / 'tokenizer.json'), str(path))
  if (path / 'vocab.txt').is_file():
    model = models.WordPiece.from_file(str(path / 'vocab.txt'), unk_token='[UNK]')
    return Tokenizer(_bert_pipeline(model), str(path))
  if (path / 'vocab.json').is_file() and (path / 'merges.txt').is_file():
    return from_hf(_byte_level_bpe(path), str(path))
  if not path.exists():
    raise DataError(f'tokenizer path {path} does not exist')
  raise DataError(f'tokenizer path {path}: no tokenizer.json, vocab.txt or vocab.json + '
                  'merges.txt in it')


def train_wordpiece(texts, vocab_size: int) -> Tokenizer:
  """A lower-case WordPiece tokenizer with [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4."""
  hf = _bert_pipeline(models.WordPiece(unk_token='[UNK]'))
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      show_progress=False)
  hf.train_from_iterator(texts, trainer=trainer)
  return Tokenizer(hf)


def _corpus_params(data) -> dict:
  """Every config field that changes the training captions, as the source declares them."""
  fields = sources_lib.source_module(data.name).CORPUS_FIELDS
  return {'name': data.name, **{f: data.get(f, None) for f in fields}}


def get_tokenizer(data, sources=None) -> Tokenizer:
  """`data.tokenizer` when set; else WordPiece trained on the train captions, cached.

  `sources` (a `Sources`), when given, supplies the train source, so that the run's
  train iterator reuses the one built here instead of reading the data again.
  """
  if data.get('tokenizer', ''):
    return load_tokenizer(data.tokenizer)
  params = dict(_corpus_params(data), vocab_size=int(data.get('vocab_size', 1000)), version=1)
  folder = cache.cache_root(data) / 'tokenizers' / f"{data.name}-{cache.cache_key(params)}"
  if (folder / 'tokenizer.json').is_file():
    return load_tokenizer(folder)
  if sources is None:
    source = sources_lib.build_source(data, 'train')
  else:
    source = sources.get(data, 'train')
  # Class names may be spelled in prompts (zero-shot); the tag vocabularies of string
  # fields (shapes' word_tags: "B-SIZE", ...) never appear in text.
  example = source[0]
  words = [n.replace('_', ' ') for key, names in source.label_names.items()
           if not isinstance(example.get(key), str) for n in names]
  logging.info('training a %d-token WordPiece tokenizer on %d captions', params['vocab_size'],
               len(source))
  tok = train_wordpiece(source.texts() + words, params['vocab_size'])
  tok.save(folder)
  return tok
