"""`make_iterator`: source -> shuffle/repeat -> preprocess -> host shard -> batch, as a grain pipeline.

Batches are formed on the MapDataset (one element = one batch), so the i-th
batch is a pure function of (config, i): grain worker processes, which each
compute every W-th element, give the same batches as none, and the iterator
state is just a position.
"""

import difflib
import json
import math

import grain
import jax
import numpy as np
from absl import flags

from mmjax.data import image_ops
from mmjax.data.errors import DataError
from mmjax.data.hosts import allgather_bytes
from mmjax.data.sources import build_source


def _numbers(key: str, value, lengths, low: float, high: float) -> tuple[float, ...]:
  """`value` as a tuple of floats, each in [low, high], of one of the `lengths`."""
  if not isinstance(value, (tuple, list)) or len(value) not in lengths or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high
      for v in value):
    raise DataError(f'data.augment.{key}={value!r}: expected {" or ".join(map(str, lengths))} '
                    f'numbers in [{low}, {high}]')
  return tuple(float(v) for v in value)


def _check_keys(where: str, options, known) -> None:
  """A DataError for the first key of `options` not in `known`, with the nearest known key:
  a misspelt option would otherwise be silently off."""
  unknown = sorted(set(options.keys()) - set(known))
  if unknown:
    nearest = difflib.get_close_matches(unknown[0], known, n=1)
    hint = f'did you mean {nearest[0]!r}? ' if nearest else ''
    raise DataError(f'{where}.{unknown[0]}: unknown key; {hint}known: {", ".join(known)}')


def _randaugment_options(value) -> dict:
  """{} (off) or {num_ops, magnitude}, with RandAugment's usual 2 and 9 for a missing key."""
  options = dict(value or {})
  if not options:
    return {}
  _check_keys('data.augment.randaugment', options, ('num_ops', 'magnitude'))
  num_ops, magnitude = options.get('num_ops', 2), options.get('magnitude', 9)
  if not isinstance(num_ops, int) or isinstance(num_ops, bool) or num_ops < 0:
    raise DataError(f'data.augment.randaugment.num_ops={num_ops!r}: expected an integer >= 0')
  if not isinstance(magnitude, (int, float)) or not 0 <= magnitude <= image_ops.MAX_MAGNITUDE:
    raise DataError(f'data.augment.randaugment.magnitude={magnitude!r}: expected a number '
                    f'in 0..{image_ops.MAX_MAGNITUDE}')
  return dict(num_ops=num_ops, magnitude=float(magnitude))


_AUGMENT_KEYS = ('crop_scale', 'flip', 'color_jitter', 'randaugment')


def _augment_options(augment) -> dict:
  """`data.augment` checked, with every absent key off. Checked when the pipeline is built,
  so a bad value fails at once rather than at the first example in a worker."""
  augment = augment or {}
  _check_keys('data.augment', augment, _AUGMENT_KEYS)
  crop_scale = _numbers('crop_scale', augment.get('crop_scale', (1.0, 1.0)), (2,), 0.0, 1.0)
  if not 0 < crop_scale[0] <= crop_scale[1]:
    raise DataError(f'data.augment.crop_scale={crop_scale}: expected (min, max) with '
                    '0 < min <= max <= 1')
  flip = augment.get('flip', False)
  if not isinstance(flip, bool):
    raise DataError(f'data.augment.flip={flip!r}: expected True or False')
  jitter = _numbers('color_jitter', augment.get('color_jitter', ()), (0, 3, 4), 0.0, math.inf)
  if len(jitter) == 4 and jitter[3] > 0.5:
    raise DataError(f'data.augment.color_jitter hue={jitter[3]}: expected at most 0.5 '
                    '(half a turn of the colour wheel)')
  return dict(crop_scale=crop_scale, flip=flip, color_jitter=jitter,
              randaugment=_randaugment_options(augment.get('randaugment', {})))


class _Preprocess:
  """Example -> example with image uint8 [S, S, 3] (augmented when `train`); text is left as
  is, and so is an example without an image (a text-only source).

  Train-time augmentation, each step as `data.augment` asks: random-resized crop, h-flip,
  colour jitter, RandAugment.
  """

  def __init__(self, image_size: int, train: bool, augment):
    self.image_size, self.train = image_size, train
    self.augment = _augment_options(augment)

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    if 'image' not in example:
      return example
    image = example['image']
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise DataError(f'source image has shape {image.shape} {image.dtype}; expected uint8 [H, W, 3]')
    if not self.train:
      return dict(example, image=image_ops.resize(image, self.image_size))
    aug = self.augment
    image = image_ops.augment_and_resize(image, self.image_size, rng, aug['crop_scale'],
                                         aug['flip'])
    if aug['color_jitter']:
      image = image_ops.color_jitter(image, rng, *aug['color_jitter'])
    if aug['randaugment']:
      image = image_ops.rand_augment(image, rng, **aug['randaugment'])
    return dict(example, image=image)


class _Collate:
  """Examples -> batch dict: normalised images (none for text-only examples), tokenized
  text, int32 labels, str arrays.

  `text_field` is the string field tokenized into text / text_mask (VQA: "question").
  `token_labels`, when set, names a string field of space-separated per-word tags
  (shapes' "word_tags"), turned into int32 [B, L] token labels under the same key
  (ids in `label_names[field]`, -1 off each word's first token).
  A `label_names` entry whose field holds strings is such a tag vocabulary, not an int label.
  `prefix_field`, when set, names a string field put before the text for a decoder:
  text = [CLS] prefix [SEP] text [SEP], and prefix_len int32 [B] counts the first part
  (VQA by generation: the question is the prefix, the answer the target).
  """

  def __init__(self, tokenizer, max_len: int, mean, std, label_names, text_field='caption',
               token_labels='', prefix_field=''):
    self.tokenizer, self.max_len = tokenizer, max_len
    self.mean, self.std, self.label_names = tuple(mean), tuple(std), dict(label_names)
    self.text_field, self.token_labels = text_field, token_labels
    self.prefix_field = prefix_field
    if prefix_field and token_labels:
      raise DataError('data.prefix_field and data.token_labels cannot be combined')
    if token_labels and token_labels not in self.label_names:
      raise DataError(f'data.token_labels={token_labels!r}: the source has no tag vocabulary '
                      f'for it; its label_names: {sorted(self.label_names)}')
    self.tag_ids = {t: i for i, t in enumerate(self.label_names.get(token_labels, ()))}

  def _texts(self, examples) -> list[str]:
    field = self.text_field
    if not isinstance(examples[0].get(field), str):
      text_fields = sorted(k for k, v in examples[0].items() if isinstance(v, str))
      raise DataError(f'data.text_field={field!r}: the examples have no text field of that '
                      f'name; their text fields: {text_fields}')
    return [e[field] for e in examples]

  def _word_labels(self, example, text: str) -> list[int]:
    field = self.token_labels
    if not isinstance(example.get(field), str):
      raise DataError(f'data.token_labels={field!r}: the examples have no string field of '
                      f'that name; their fields: {sorted(example)}')
    tags = example[field].split()
    unknown = [t for t in tags if t not in self.tag_ids]
    if unknown:
      raise DataError(f'data.token_labels={field!r}: tag {unknown[0]!r} is not in its '
                      f'vocabulary {list(self.tag_ids)}')
    if len(tags) != len(text.split()):
      raise DataError(f'data.token_labels={field!r} has {len(tags)} tags for the '
                      f'{len(text.split())} words of data.text_field={self.text_field!r}: {text!r}')
    return [self.tag_ids[t] for t in tags]

  def __call__(self, examples) -> dict:
    batch = {}
    if 'image' in examples[0]:
      batch['image'] = image_ops.normalize(np.stack([e['image'] for e in examples]),
                                           self.mean, self.std)  # [B, S, S, 3]
    texts = self._texts(examples)
    for key, value in examples[0].items():
      if isinstance(value, str):
        batch[key] = np.array([e[key] for e in examples], dtype=np.str_)
    if self.token_labels:  # [B, L] each
      word_labels = [self._word_labels(e, t) for e, t in zip(examples, texts)]
      batch['text'], batch['text_mask'], batch[self.token_labels] = (
          self.tokenizer.encode_word_labels(texts, word_labels, self.max_len))
    elif self.prefix_field:
      batch['text'], batch['text_mask'], batch['prefix_len'] = self._with_prefix(examples,
                                                                                  texts)
    else:
      batch['text'], batch['text_mask'] = self.tokenizer.encode(texts, self.max_len)  # [B, L]
    for key in self.label_names:
      if not isinstance(examples[0][key], str):
        batch[key] = np.array([e[key] for e in examples], np.int32)
    batch['valid'] = np.array([e.get('_valid', 1.0) for e in examples], np.float32)
    return batch


  def _with_prefix(self, examples, texts):
    """[CLS] prefix [SEP] + text [SEP] per row: ids, mask [B, L] and prefix_len [B]."""
    field = self.prefix_field
    if not isinstance(examples[0].get(field), str):
      raise DataError(f'data.prefix_field={field!r}: the examples have no text field of that '
                      f'name; their fields: {sorted(examples[0])}')
    p_ids, p_mask = self.tokenizer.encode([e[field] for e in examples], self.max_len)
    t_ids, t_mask = self.tokenizer.encode(texts, self.max_len)
    ids = np.full_like(p_ids, self.tokenizer.pad_id)
    mask = np.zeros_like(p_mask)
    prefix_len = p_mask.sum(axis=1).astype(np.int32)
    for row, (n, m) in enumerate(zip(prefix_len, t_mask.sum(axis=1))):
      if n + m - 1 > self.max_len:
        raise DataError(f'data.max_len={self.max_len} cannot hold data.prefix_field={field!r} '
                        f'and data.text_field={self.text_field!r} together ({n + m - 1} tokens): '
                        f'{examples[row][field]!r} {texts[row]!r}')
      ids[row, :n + m - 1] = np.concatenate([p_ids[row, :n], t_ids[row, 1:m]])   # one [CLS]
      mask[row, :n + m - 1] = 1
    return ids, mask, prefix_len


class _PadTo:
  """Index -> example for indices < len(source); beyond that a copy of example 0 marked invalid."""

  def __init__(self, source):
    self.source = source

  def __call__(self, index: int) -> dict:
    if index < len(self.source):
      return self.source[index]
    return dict(self.source[0], _valid=0.0)


class _Subset:
  """The examples `indices` of `source`, itself a source."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices, self.label_names = source, indices, source.label_names

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.indices[index])]


def _label_budget(source, n: int, seed: int, split: str):
  """`source` cut to a fixed seeded subset of `n` examples (`data.train_examples`, 0 = all),
  the same in every run with this seed. Stratified when the source holds its labels in
  memory (`source.labels`, e.g. digits): each class keeps its share of the n."""
  if n == 0:
    return source
  if not 0 < n <= len(source):
    raise DataError(f'data.train_examples={n}: the {split} split has {len(source)} examples '
                    f'(use 1..{len(source)}, or 0 for all)')
  order = np.random.default_rng(seed).permutation(len(source))
  labels = getattr(source, 'labels', None)
  if labels is not None:
    labels = np.asarray(labels)[order]
    _, cls, counts = np.unique(labels, return_inverse=True, return_counts=True)
    rank = np.zeros(len(order))             # each example's place within its class
    for c in range(len(counts)):
      rank[cls == c] = np.arange(counts[c])
    # Classes interleaved in proportion to their sizes: any prefix keeps their shares.
    order = order[np.argsort((rank + 0.5) / counts[cls], kind='stable')]
  return _Subset(source, np.sort(order[:n]))


def _process_defaults(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} is outside 0..{process_count - 1}')
  return process_index, process_count


def _transforms(data, source, train: bool, tokenizer) -> tuple[_Preprocess, _Collate]:
  """The per-example preprocessing and the batch collation that `data` asks for."""
  preprocess = _Preprocess(int(data.image_size), train, data.get('augment', None))
  collate = _Collate(tokenizer, int(data.max_len), data.get('mean', (0.5, 0.5, 0.5)),
                     data.get('std', (0.5, 0.5, 0.5)), source.label_names,
                     data.get('text_field', 'caption'), data.get('token_labels', ''),
                     data.get('prefix_field', ''))
  return preprocess, collate


def make_dataset(data, split: str, *, batch_size: int, train: bool, tokenizer,
                 process_index=None, process_count=None, num_epochs=None,
                 source=None) -> grain.MapDataset:
  """The MapDataset of this process's batches (infinite when training with num_epochs=None)."""
  process_index, process_count = _process_defaults(process_index, process_count)
  source = build_source(data, split) if source is None else source
  seed = int(data.get('seed', 0))
  preprocess, collate = _transforms(data, source, train, tokenizer)
  if train:
    if getattr(source, 'streaming', False):
      raise DataError(f'data.name={data.name} is read as a stream: train on make_iterator')
    source = _label_budget(source, int(data.get('train_examples', 0)), seed, split)
    if len(source) < batch_size * process_count:
      raise DataError(f'{split}: {len(source)} examples, fewer than one global batch of '
                      f'{batch_size} x {process_count} processes')
    ds = grain.MapDataset.source(source).shuffle(seed).repeat(num_epochs)
  else:
    # Pad so every process gets the same whole number of batches (hosts must step together).
    per_process = math.ceil(len(source) / (process_count * batch_size)) * batch_size
    ds = grain.MapDataset.range(per_process * process_count).map(_PadTo(source))
  # Augmentation is keyed by the global position, so it does not depend on process_count.
  ds = ds.random_map(preprocess, seed=seed)
  ds = ds[process_index::process_count]
  return ds.batch(batch_size, drop_remainder=train, batch_fn=collate)


def _prefetch(ds: grain.IterDataset, workers: int) -> grain.IterDataset:
  """`ds` computed in `workers` grain processes (none: in this one)."""
  if workers <= 0:
    return ds
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain reads its flags; outside an absl app none were parsed
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))


class ProcessStates:
  """A streamed source's batches, whose position differs between processes: `get_state`
  gathers every process's into the one checkpointed state (a collective: every process
  calls it at the same step, as the loop's checkpoints do); `set_state` takes its own back."""

  def __init__(self, iterator, process_index: int, process_count: int):
    self.iterator, self.index, self.count = iterator, process_index, process_count

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self.iterator)

  def get_state(self) -> dict:
    state = self.iterator.get_state()
    if self.count == 1:
      return {'processes': [state]}
    gathered = allgather_bytes([json.dumps(state).encode()])
    return {'processes': [json.loads(one) for [one] in gathered]}

  def set_state(self, state: dict) -> None:
    states = state.get('processes')
    if not isinstance(states, list) or len(states) != self.count:
      saved = len(states) if isinstance(states, list) else 'no per-process'
      raise DataError(f'the checkpointed data position was saved by {saved} processes and '
                      f'this run has {self.count}: resume a streamed source (data.name='
                      'webdataset) with the same number of processes')
    self.iterator.set_state(states[self.index])


def _stream_iterator(data, source, *, batch_size: int, tokenizer, process_index: int,
                     process_count: int, num_epochs) -> ProcessStates:
  """Train batches of a source read as a stream (`source.stream`: webdataset shards)."""
  if int(data.get('train_examples', 0)):
    raise DataError(f'data.train_examples={data.train_examples}: a streamed source '
                    f'(data.name={data.name}) has no fixed subset; leave it at 0')
  seed, workers = int(data.get('seed', 0)), int(data.get('num_workers', 0))
  preprocess, collate = _transforms(data, source, True, tokenizer)
  ds = source.stream(seed=seed, process_index=process_index, process_count=process_count,
                     num_epochs=num_epochs, readers=max(workers, 1))
  ds = ds.random_map(preprocess, seed=seed).batch(batch_size, drop_remainder=True,
                                                   batch_fn=collate)
  if workers <= 0:   # decode beside the train step, not in it
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=4)
  return ProcessStates(iter(_prefetch(ds, workers)), process_index, process_count)


def make_iterator(data, split: str, *, batch_size: int, train: bool, tokenizer,
                  process_index=None, process_count=None, num_epochs=None,
                  source=None):
  """A checkpointable iterator of numpy batch dicts for this process (see the module docstring).

  Keys: image float32 [B, S, S, 3] (none from a text-only source); text, text_mask int32
  [B, L]; each integer label of the source int32 [B]; caption (and other string fields)
  str [B]; valid float32 [B] (0 on the padding that fills the last eval batch). Eval is
  one pass, unshuffled. A streamed source (`source.streaming`) trains through
  `_stream_iterator` instead.
  """
  source = build_source(data, split) if source is None else source
  if train and getattr(source, 'streaming', False):
    process_index, process_count = _process_defaults(process_index, process_count)
    return _stream_iterator(data, source, batch_size=batch_size, tokenizer=tokenizer,
                            process_index=process_index, process_count=process_count,
                            num_epochs=num_epochs)
  ds = make_dataset(data, split, batch_size=batch_size, train=train, tokenizer=tokenizer,
                    process_index=process_index, process_count=process_count,
                    num_epochs=num_epochs, source=source)
  # One element is a whole batch: keep the read-ahead to a few of them.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  return iter(_prefetch(it, int(data.get('num_workers', 0))))
