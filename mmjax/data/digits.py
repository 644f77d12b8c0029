"""`digits`: scikit-learn's bundled handwritten digits (1797 real 8x8 scans) with captions."""

import numpy as np
from PIL import Image

from mmjax.data.errors import DataError

DIGIT_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
_PHRASINGS = ('a handwritten digit {}', 'a scan of the handwritten number {}',
              'the digit {}, written by hand')
_TEST_FRACTION = 0.2


def split_indices(seed: int, split: str, labels: np.ndarray) -> np.ndarray:
  """Sorted indices of a seeded stratified 80/20 train/test split."""
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  if split not in ('train', 'test'):
    raise DataError(f"digits: unknown split {split!r}; expected 'train' or 'test'")
  train, test = train_test_split(np.arange(len(labels)), test_size=_TEST_FRACTION,
                                 random_state=seed, stratify=labels)
  return np.sort(train if split == 'train' else test)


def caption(label: int, index: int) -> str:
  """One of a few phrasings, fixed per example index."""
  return _PHRASINGS[index % len(_PHRASINGS)].format(DIGIT_NAMES[label])


def upsample(scan: np.ndarray, size: int) -> np.ndarray:
  """float [8, 8] in 0..16 -> uint8 RGB [size, size, 3], bilinear."""
  grey = Image.fromarray((scan * (255.0 / 16.0)).astype(np.float32), mode='F')
  grey = np.asarray(grey.resize((size, size), Image.Resampling.BILINEAR))
  return np.repeat(np.clip(grey + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


class DigitsSource:
  """The whole split upsampled in memory (1797 images in all: small)."""

  label_names = {'label': list(DIGIT_NAMES)}

  def __init__(self, seed: int, split: str, image_size: int):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    bunch = load_digits()
    self.indices = split_indices(seed, split, bunch.target)
    self.labels = bunch.target[self.indices].astype(np.int32)
    self.images = np.stack([upsample(bunch.images[i], image_size) for i in self.indices])
    self.skipped = {}

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    label = int(self.labels[i])
    return dict(image=self.images[i], caption=caption(label, int(self.indices[i])), label=label)

  def texts(self) -> list[str]:
    return [self[i]['caption'] for i in range(len(self))]


# The data.* fields that change the captions: the tokenizer's cache key (sources.SOURCES).
CORPUS_FIELDS = ('seed',)


def build(data, split: str) -> DigitsSource:
  return DigitsSource(int(data.get('seed', 0)), split, int(data.image_size))
