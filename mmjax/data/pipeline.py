"""`make_iterator`: source -> shuffle/repeat -> preprocess -> host shard -> batch, as a grain pipeline.

Batches are formed on the MapDataset (one element = one batch), so the i-th
batch is a pure function of (config, i): grain worker processes, which each
compute every W-th element, give the same batches as none, and the iterator
state is just a position.
"""

import math

import grain
import numpy as np

from mmjax.data import image_ops
from mmjax.data.errors import DataError
from mmjax.data.sources import build_source


class _Preprocess:
  """Example -> example with image uint8 [S, S, 3] (augmented when `train`); text is left as is."""

  def __init__(self, image_size: int, train: bool, crop_scale, flip: bool):
    self.image_size, self.train = image_size, train
    self.crop_scale, self.flip = tuple(crop_scale), bool(flip)

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    image = example['image']
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise DataError(f'source image has shape {image.shape} {image.dtype}; expected uint8 [H, W, 3]')
    if self.train:
      image = image_ops.augment_and_resize(image, self.image_size, rng, self.crop_scale, self.flip)
    else:
      image = image_ops.resize(image, self.image_size)
    return dict(example, image=image)


class _Collate:
  """Examples -> batch dict: normalised images, tokenized captions, int32 labels, str arrays."""

  def __init__(self, tokenizer, max_len: int, mean, std, int_keys):
    self.tokenizer, self.max_len = tokenizer, max_len
    self.mean, self.std, self.int_keys = tuple(mean), tuple(std), tuple(int_keys)

  def __call__(self, examples) -> dict:
    batch = {'image': image_ops.normalize(np.stack([e['image'] for e in examples]),
                                          self.mean, self.std)}  # [B, S, S, 3]
    captions = [e['caption'] for e in examples]
    batch['text'], batch['text_mask'] = self.tokenizer.encode(captions, self.max_len)  # [B, L]
    for key in self.int_keys:
      batch[key] = np.array([e[key] for e in examples], np.int32)
    for key, value in examples[0].items():
      if isinstance(value, str):
        batch[key] = np.array([e[key] for e in examples], dtype=np.str_)
    batch['valid'] = np.array([e.get('_valid', 1.0) for e in examples], np.float32)
    return batch


class _PadTo:
  """Index -> example for indices < len(source); beyond that a copy of example 0 marked invalid."""

  def __init__(self, source):
    self.source = source

  def __call__(self, index: int) -> dict:
    if index < len(self.source):
      return self.source[index]
    return dict(self.source[0], _valid=0.0)


def _process_defaults(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} is outside 0..{process_count - 1}')
  return process_index, process_count


def make_dataset(data, split: str, *, batch_size: int, train: bool, tokenizer,
                 process_index=None, process_count=None, num_epochs=None,
                 source=None) -> grain.MapDataset:
  """The MapDataset of this process's batches (infinite when training with num_epochs=None)."""
  process_index, process_count = _process_defaults(process_index, process_count)
  source = build_source(data, split) if source is None else source
  seed = int(data.get('seed', 0))
  augment = data.get('augment', None) or {}
  preprocess = _Preprocess(
      int(data.image_size), train,
      crop_scale=augment.get('crop_scale', (1.0, 1.0)) if train else (1.0, 1.0),
      flip=augment.get('flip', False) and train)
  collate = _Collate(tokenizer, int(data.max_len), data.get('mean', (0.5, 0.5, 0.5)),
                     data.get('std', (0.5, 0.5, 0.5)), sorted(source.label_names))
  if train:
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


def make_iterator(data, split: str, *, batch_size: int, train: bool, tokenizer,
                  process_index=None, process_count=None, num_epochs=None,
                  source=None) -> grain.DatasetIterator:
  """A checkpointable iterator of numpy batch dicts for this process (see the module docstring).

  Keys: image float32 [B, S, S, 3]; text, text_mask int32 [B, L]; each integer label
  of the source int32 [B]; caption (and other string fields) str [B]; valid float32 [B]
  (0 on the padding that fills the last eval batch). Eval is one pass, unshuffled.
  """
  ds = make_dataset(data, split, batch_size=batch_size, train=train, tokenizer=tokenizer,
                    process_index=process_index, process_count=process_count,
                    num_epochs=num_epochs, source=source)
  # One element is a whole batch: keep the read-ahead to a few of them.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  workers = int(data.get('num_workers', 0))
  if workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain reads its flags; outside an absl app none were parsed
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
  return iter(it)
