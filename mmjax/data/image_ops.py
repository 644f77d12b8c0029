"""Image preprocessing on numpy: random-resized crop, flip, resize, normalise."""

import math

import numpy as np
from PIL import Image

_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of a random-resized crop


def crop_box(height: int, width: int, scale: tuple[float, float],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) covering a `scale` fraction of the area at a random aspect ratio.

  Falls back to the largest centred box of aspect ratio in range after ten misses
  (the same rule as Inception-style random-resized crops).
  """
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(*scale)
    ratio = math.exp(rng.uniform(math.log(_RATIO[0]), math.log(_RATIO[1])))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  ratio = min(max(width / height, _RATIO[0]), _RATIO[1])
  w, h = (width, int(round(width / ratio))) if width / height < ratio else (
      int(round(height * ratio)), height)
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def resize(image: np.ndarray, size: int, box=None) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3], bilinear with antialiasing, of `box` if given."""
  if box is None and image.shape[:2] == (size, size):
    return image
  pil = Image.fromarray(np.ascontiguousarray(image))
  return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR, box=box))


def augment_and_resize(image: np.ndarray, size: int, rng: np.random.Generator,
                       crop_scale=(1.0, 1.0), flip=False) -> np.ndarray:
  """The train-time view of an image: optional random-resized crop, optional h-flip."""
  box = None
  if tuple(crop_scale) != (1.0, 1.0):
    box = crop_box(image.shape[0], image.shape[1], tuple(crop_scale), rng)
  image = resize(image, size, box)
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return image


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 [..., 3] -> float32, scaled to [0, 1] and then (x - mean) / std per channel."""
  scale = np.float32(1 / 255)
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (images.astype(np.float32) * scale - mean) / std
