"""Image preprocessing on numpy: any pixel array to uint8 RGB, random-resized crop, flip,
colour jitter, RandAugment, resize, normalise.

RandAugment is written here because no maintained numpy/PIL implementation exists outside torch/TF.
"""

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of a random-resized crop
BACKGROUND = 255  # transparent pixels are composited onto white (in every channel)


def to_uint8(values: np.ndarray) -> np.ndarray:
  """Pixel values of any dtype -> uint8 of the same shape, by the values' bit depth.

  uint8 as is; bool (1-bit) x 255; integers up to 65535 are 16-bit, their high byte kept
  (v >> 8, so 32768 -> 128), also when stored wider (PIL's mode I, 32-bit, holds 16-bit
  PNGs); integers above 65535 are scaled by their maximum to 0..255. Floats whose
  maximum is <= 1 are [0, 1] and scaled x 255; other floats are taken as 0..255 already
  and clipped. Negative and NaN values become 0.
  """
  if values.dtype == np.uint8:
    return values
  if values.dtype == np.bool_:
    return values.astype(np.uint8) * np.uint8(255)
  if np.issubdtype(values.dtype, np.integer):
    values = values.astype(np.int64).clip(0, None)
    top = int(values.max(initial=0))
    if top > 65535:
      return (values * 255 // top).astype(np.uint8)
    return (values >> 8).astype(np.uint8)
  if np.issubdtype(values.dtype, np.floating):
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.max(initial=0.0) <= 1.0:
      values = values * 255.0
    return np.round(values.clip(0.0, 255.0)).astype(np.uint8)
  raise ValueError(f'pixel values of dtype {values.dtype}: expected integers, floats or bools')


def to_rgb(values: np.ndarray) -> np.ndarray:
  """An image array of any dtype (see `to_uint8`) -> uint8 RGB [H, W, 3].

  `values` is [H, W] or [H, W, C] with C = 1 (grey), 2 (grey, alpha), 3 (RGB) or
  4 (RGBA); alpha is composited onto BACKGROUND, so a transparent pixel is white.
  """
  values = to_uint8(np.asarray(values))
  if values.ndim == 2:
    values = values[..., None]
  if values.ndim != 3 or values.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f'image array of shape {values.shape}: expected [H, W] or [H, W, C] '
                     'with C = 1 (grey), 2 (grey, alpha), 3 (RGB) or 4 (RGBA)')
  if values.shape[-1] in (2, 4):
    color, alpha = values[..., :-1].astype(np.uint32), values[..., -1:].astype(np.uint32)
    values = ((color * alpha + BACKGROUND * (255 - alpha) + 127) // 255).astype(np.uint8)
  if values.shape[-1] == 1:
    values = np.repeat(values, 3, axis=-1)
  return values


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


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float,
                 contrast: float, saturation: float, hue: float = 0.0) -> np.ndarray:
  """uint8 [H, W, 3] -> same, with brightness, contrast and saturation scaled by factors
  drawn from [1 - x, 1 + x] and the hue rotated by a fraction of the wheel in [-hue, hue],
  in a random order (as torchvision's ColorJitter). A zero strength is skipped, so all
  zeros return the image unchanged."""
  ops = [(brightness, lambda im, f: ImageEnhance.Brightness(im).enhance(f)),
         (contrast, lambda im, f: ImageEnhance.Contrast(im).enhance(f)),
         (saturation, lambda im, f: ImageEnhance.Color(im).enhance(f))]
  ops = [(rng.uniform(max(0.0, 1 - x), 1 + x), op) for x, op in ops if x > 0]
  if hue > 0:
    ops.append((rng.uniform(-hue, hue), _shift_hue))
  pil = Image.fromarray(np.ascontiguousarray(image))
  for i in rng.permutation(len(ops)):
    amount, op = ops[i]
    pil = op(pil, amount)
  return np.asarray(pil)


def _shift_hue(pil: Image.Image, shift: float) -> Image.Image:
  """Rotate the hue by `shift` turns of the colour wheel."""
  hsv = np.array(pil.convert('HSV'))
  hsv[..., 0] += np.uint8(round(shift * 256) % 256)  # uint8 wraps around the wheel
  return Image.fromarray(hsv, 'HSV').convert('RGB')


# RandAugment (Cubuk et al. 2020). `s` is the strength, magnitude / 10: at magnitude 10
# each op reaches the paper's (AutoAugment's) table maximum, above it the op extrapolates
# linearly up to 3x at magnitude 30, clipped where it saturates. `sign` is a random +-1
# that only the signed ops use. Geometric ops fill uncovered pixels with black.
_FILL = (0, 0, 0)


def _enhance(kind, im, s, sign):
  return kind(im).enhance(max(0.0, 1 + sign * 0.9 * s))


def _affine(im, matrix):
  """Output pixel (x, y) reads input (a x + b y + c, d x + e y + f)."""
  return im.transform(im.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR,
                      fillcolor=_FILL)


_RAND_OPS = {
    'identity': lambda im, s, sign: im,
    'autocontrast': lambda im, s, sign: ImageOps.autocontrast(im),
    'equalize': lambda im, s, sign: ImageOps.equalize(im),
    'rotate': lambda im, s, sign: im.rotate(sign * 30 * s, Image.Resampling.BILINEAR,
                                            fillcolor=_FILL),
    'solarize': lambda im, s, sign: ImageOps.solarize(im, max(0, 256 - round(256 * s))),
    'color': lambda im, s, sign: _enhance(ImageEnhance.Color, im, s, sign),
    'posterize': lambda im, s, sign: ImageOps.posterize(im, max(1, 8 - round(4 * s))),
    'contrast': lambda im, s, sign: _enhance(ImageEnhance.Contrast, im, s, sign),
    'brightness': lambda im, s, sign: _enhance(ImageEnhance.Brightness, im, s, sign),
    'sharpness': lambda im, s, sign: _enhance(ImageEnhance.Sharpness, im, s, sign),
    'shear_x': lambda im, s, sign: _affine(im, (1, sign * 0.3 * s, 0, 0, 1, 0)),
    'shear_y': lambda im, s, sign: _affine(im, (1, 0, 0, sign * 0.3 * s, 1, 0)),
    'translate_x': lambda im, s, sign: _affine(im, (1, 0, sign * 0.45 * s * im.width, 0, 1, 0)),
    'translate_y': lambda im, s, sign: _affine(im, (1, 0, 0, 0, 1, sign * 0.45 * s * im.height)),
}
RAND_OPS = tuple(_RAND_OPS)
MAX_MAGNITUDE = 30


def rand_augment_op(image: np.ndarray, name: str, magnitude: float, sign: int = 1) -> np.ndarray:
  """uint8 [H, W, 3] -> same: the RandAugment op `name` at `magnitude` (0..30)."""
  pil = Image.fromarray(np.ascontiguousarray(image))
  return np.asarray(_RAND_OPS[name](pil, magnitude / 10, sign))


def rand_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int = 2,
                 magnitude: float = 9) -> np.ndarray:
  """uint8 [H, W, 3] -> same: `num_ops` ops drawn uniformly (with repeats) from RAND_OPS,
  each at `magnitude` with a random sign."""
  for _ in range(num_ops):
    name = RAND_OPS[rng.integers(len(RAND_OPS))]
    image = rand_augment_op(image, name, magnitude, sign=rng.choice((-1, 1)))
  return image


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 [..., 3] -> float32, scaled to [0, 1] and then (x - mean) / std per channel."""
  scale = np.float32(1 / 255)
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (images.astype(np.float32) * scale - mean) / std
