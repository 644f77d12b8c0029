"""`tfds`: a prepared TensorFlow Datasets dataset read from array_record files (no TensorFlow)."""

import numpy as np

from mmjax.data import image_ops
from mmjax.data.errors import DataError


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class TfdsSource:
  """Wraps `tfds.data_source`; examples are renamed to image / caption / <label_key>."""

  def __init__(self, name, split, data_dir, image_key='image', text_key='', label_key='label',
               caption_template='a photo of a {}.'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise DataError(f'data.tfds_name={name!r}: not found in data_dir={data_dir!r} ({e})') from e
    if split not in builder.info.splits:
      raise DataError(f'{name}: no split {split!r} in {data_dir}; it has {sorted(builder.info.splits)}')
    features = builder.info.features
    for field, key in (('image_key', image_key), ('text_key', text_key), ('label_key', label_key)):
      if key and key not in features:
        raise DataError(f'data.{field}={key!r}: {name} has no such feature; '
                        f'its features are {sorted(features.keys())}')
    if not text_key and not label_key:
      raise DataError(f'{name}: set data.text_key, or data.label_key to make captions from labels')
    self.image_key, self.text_key, self.label_key = image_key, text_key, label_key
    self.caption_template = caption_template
    self.label_names = {}
    if label_key:
      names = getattr(features[label_key], 'names', None)
      if names is None:
        raise DataError(f'data.label_key={label_key!r}: {name} feature is '
                        f'{type(features[label_key]).__name__}, not a ClassLabel')
      self.label_names[label_key] = list(names)
    self.skipped = {}
    self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    record = self._source[i]
    # Grey, grey + alpha, RGBA and 16-bit or float images all become uint8 RGB.
    example = {'image': image_ops.to_rgb(np.asarray(record[self.image_key]))}
    if self.label_key:
      example[self.label_key] = int(record[self.label_key])
    if self.text_key:
      example['caption'] = _text(record[self.text_key])
    else:
      example['caption'] = self.caption_template.format(
          self.label_names[self.label_key][example[self.label_key]].replace('_', ' '))
    return example

  def texts(self) -> list[str]:
    if not self.text_key:  # captions come from the label names alone
      return [self.caption_template.format(n.replace('_', ' '))
              for n in self.label_names[self.label_key]]
    return [_text(self._source[i][self.text_key]) for i in range(len(self))]


# The data.* fields that change the captions: the tokenizer's cache key (sources.SOURCES).
CORPUS_FIELDS = ('tfds_name', 'data_dir', 'text_key', 'label_key', 'caption_template')


def build(data, split: str) -> TfdsSource:
  return TfdsSource(
      name=data.tfds_name, split=split, data_dir=data.get('data_dir', ''),
      image_key=data.get('image_key', 'image') or 'image', text_key=data.get('text_key', ''),
      label_key=data.get('label_key', 'label'),
      caption_template=data.get('caption_template', 'a photo of a {}.'))
