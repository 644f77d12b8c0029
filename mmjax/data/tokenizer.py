"""Text to token ids: a thin wrapper over a Hugging Face `tokenizers.Tokenizer`.

Sequences are `[CLS] tokens [SEP]` padded to a fixed length; the ids of the
special tokens are found by name, so BERT-style ([CLS]) and RoBERTa-style
(<s>) vocabularies both work.
"""

import logging
import os
import pathlib

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from mmjax.data import cache
from mmjax.data.errors import DataError

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

  def encode(self, texts, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] tokens [SEP]`, truncated so that [SEP] stays last, padded with pad_id."""
    if max_len < 2:
      raise DataError(f'max_len={max_len}: need room for [CLS] and [SEP]')
    if isinstance(texts, str):
      texts = [texts]
    ids = np.full((len(texts), max_len), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    for row, enc in enumerate(self.hf.encode_batch(list(texts), add_special_tokens=False)):
      tokens = [self.cls_id] + enc.ids[:max_len - 2] + [self.sep_id]
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask

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


def _bert_pipeline(model) -> tokenizers.Tokenizer:
  hf = tokenizers.Tokenizer(model)
  hf.normalizer = normalizers.BertNormalizer(lowercase=True)
  hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  hf.decoder = decoders.WordPiece()
  return hf


def load_tokenizer(path) -> Tokenizer:
  """A local Hugging Face tokenizer dir: tokenizer.json, or a BERT vocab.txt alone."""
  path = pathlib.Path(path).expanduser()
  if path.is_file() and path.suffix == '.json':
    return Tokenizer(tokenizers.Tokenizer.from_file(str(path)), str(path))
  if (path / 'tokenizer.json').is_file():
    return Tokenizer(tokenizers.Tokenizer.from_file(str(path / 'tokenizer.json')), str(path))
  if (path / 'vocab.txt').is_file():
    model = models.WordPiece.from_file(str(path / 'vocab.txt'), unk_token='[UNK]')
    return Tokenizer(_bert_pipeline(model), str(path))
  if not path.exists():
    raise DataError(f'tokenizer path {path} does not exist')
  raise DataError(f'tokenizer path {path}: no tokenizer.json or vocab.txt in it')


def train_wordpiece(texts, vocab_size: int) -> Tokenizer:
  """A lower-case WordPiece tokenizer with [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4."""
  hf = _bert_pipeline(models.WordPiece(unk_token='[UNK]'))
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      show_progress=False)
  hf.train_from_iterator(texts, trainer=trainer)
  return Tokenizer(hf)


def _corpus_params(data) -> dict:
  """Every config field that changes the training captions, by source name."""
  fields = {'shapes': ('seed', 'train_size', 'num_objects'), 'digits': ('seed',),
            'files': ('path', 'text_key', 'image_key', 'image_dir', 'label_key'),
            'tfds': ('tfds_name', 'data_dir', 'text_key', 'label_key', 'caption_template')}
  if data.name not in fields:
    raise DataError(f'data.name={data.name!r}: expected one of {sorted(fields)}')
  return {'name': data.name, **{f: data.get(f, None) for f in fields[data.name]}}


def get_tokenizer(data) -> Tokenizer:
  """`data.tokenizer` when set; else WordPiece trained on the train captions, cached."""
  if data.get('tokenizer', ''):
    return load_tokenizer(data.tokenizer)
  from mmjax.data.sources import build_source  # pylint: disable=g-import-not-at-top
  params = dict(_corpus_params(data), vocab_size=int(data.get('vocab_size', 1000)), version=1)
  folder = cache.cache_root(data) / 'tokenizers' / f"{data.name}-{cache.cache_key(params)}"
  if (folder / 'tokenizer.json').is_file():
    return load_tokenizer(folder)
  source = build_source(data, 'train')
  words = [n.replace('_', ' ') for names in source.label_names.values() for n in names]
  logging.info('training a %d-token WordPiece tokenizer on %d captions', params['vocab_size'],
               len(source))
  tok = train_wordpiece(source.texts() + words, params['vocab_size'])
  tok.save(folder)
  return tok
