"""`shapes`: procedurally rendered coloured shapes with compositional captions.

Every example is a pure function of (seed, split, index): the scene is drawn
from `np.random.default_rng([seed, split_id, index])`, so splits never share a
random stream. A split is rendered once into a .npy cache (images) and a .npz
(captions, labels, question/answer pairs) and read back with a memory map.
"""

import logging
import os
import pathlib

import numpy as np
from PIL import Image, ImageDraw

from mmjax.data import cache
from mmjax.data.errors import DataError

COLORS = ('red', 'green', 'blue', 'yellow', 'purple', 'white')
SHAPES = ('circle', 'square', 'triangle', 'cross')
SIZES = ('small', 'large')
NUMBERS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
ANSWERS = ('no', 'yes') + NUMBERS + COLORS + SHAPES + SIZES

_RGB = {
    'red': (220, 45, 45), 'green': (45, 185, 65), 'blue': (55, 95, 235),
    'yellow': (235, 215, 45), 'purple': (155, 65, 205), 'white': (240, 240, 240),
}
_RADIUS = {'small': 0.10, 'large': 0.17}  # of the image side
_GAP = 0.02  # least distance between two objects' bounding circles
_SUPERSAMPLE = 4  # draw this much larger, then downsample: anti-aliasing
_SPLITS = {'train': 0, 'val': 1, 'test': 2}
FORMAT_VERSION = 1  # bump when rendering or captions change

# ---------------------------------------------------------------- scenes


def sample_scene(rng: np.random.Generator, num_objects: tuple[int, int]) -> list[dict]:
  """Objects {shape, color, size, x, y, r} (x, y, r in image-side units) that do not overlap."""
  count = int(rng.integers(num_objects[0], num_objects[1] + 1))
  while True:
    objects = []
    for _ in range(count):
      size = SIZES[rng.integers(len(SIZES))]
      r = _RADIUS[size]
      for _ in range(50):
        x, y = rng.uniform(r + _GAP, 1 - r - _GAP, size=2)
        if all(np.hypot(x - o['x'], y - o['y']) > r + o['r'] + _GAP for o in objects):
          break
      else:
        break  # no room left: draw the whole scene again
      objects.append(dict(shape=SHAPES[rng.integers(len(SHAPES))],
                          color=COLORS[rng.integers(len(COLORS))],
                          size=size, x=float(x), y=float(y), r=r))
    if len(objects) == count:
      return objects


def _phrase(o: dict) -> str:
  return f"a {o['size']} {o['color']} {o['shape']}"


def relation(a: dict, b: dict) -> str:
  """Where `a` is relative to `b`, along the axis on which they are further apart."""
  dx, dy = a['x'] - b['x'], a['y'] - b['y']
  if abs(dx) >= abs(dy):
    return 'left of' if dx < 0 else 'right of'
  return 'above' if dy < 0 else 'below'  # image y grows downwards


def describe(objects: list[dict], rng: np.random.Generator) -> tuple[str, dict]:
  """(caption, the first-mentioned object). Two objects are related; three are listed left to right."""
  if len(objects) == 1:
    return _phrase(objects[0]), objects[0]
  if len(objects) == 2:
    a, b = objects if rng.random() < 0.5 else objects[::-1]
    return f'{_phrase(a)} {relation(a, b)} {_phrase(b)}', a
  ordered = sorted(objects, key=lambda o: o['x'])
  phrases = [_phrase(o) for o in ordered]
  return ', '.join(phrases[:-1]) + ' and ' + phrases[-1], ordered[0]


# BIO tags of caption words, "O" first: attributes and relation phrases are the entities.
WORD_TAGS = ('O', 'B-SIZE', 'B-COLOR', 'B-SHAPE', 'B-REL', 'I-REL')
_ENTITY = {**{w: 'SIZE' for w in SIZES}, **{w: 'COLOR' for w in COLORS},
           **{w: 'SHAPE' for w in SHAPES}}


def word_tags(caption: str) -> list[str]:
  """One BIO tag per whitespace word of a caption: sizes, colours and shapes are one-word
  entities; "left of" / "right of" are B-REL I-REL, "above" / "below" B-REL.

  A comma is punctuation, not a word: the three-object form's "circle," is the word
  "circle" (tagged B-SHAPE), so tags line up with `caption.split()`.
  """
  words = [w.rstrip(',') for w in caption.split()]
  tags = []
  for i, word in enumerate(words):
    if word in _ENTITY:
      tags.append('B-' + _ENTITY[word])
    elif word in ('above', 'below') or (word in ('left', 'right') and words[i + 1:i + 2] == ['of']):
      tags.append('B-REL')
    elif word == 'of' and i > 0 and words[i - 1] in ('left', 'right'):
      tags.append('I-REL')
    else:
      tags.append('O')
  return tags


def _unique(objects, key):
  """The objects whose value of `key` no other object shares."""
  values = [key(o) for o in objects]
  return [o for o, v in zip(objects, values) if values.count(v) == 1]


def ask(objects: list[dict], rng: np.random.Generator) -> tuple[str, str]:
  """One (question, answer) about the scene, answerable from the image alone."""
  kind = ('count', 'color', 'shape', 'size', 'exists')[rng.integers(5)]
  if kind == 'color' and (pool := _unique(objects, lambda o: o['shape'])):
    o = pool[rng.integers(len(pool))]
    return f"what colour is the {o['shape']}?", o['color']
  if kind == 'shape' and (pool := _unique(objects, lambda o: o['color'])):
    o = pool[rng.integers(len(pool))]
    return f"what shape is the {o['color']} object?", o['shape']
  if kind == 'size' and (pool := _unique(objects, lambda o: (o['color'], o['shape']))):
    o = pool[rng.integers(len(pool))]
    return f"what size is the {o['color']} {o['shape']}?", o['size']
  if kind == 'exists':
    present = {(o['color'], o['shape']) for o in objects}
    color, shape = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
    if rng.random() < 0.5:
      o = objects[rng.integers(len(objects))]
      color, shape = o['color'], o['shape']
    return f'is there a {color} {shape}?', 'yes' if (color, shape) in present else 'no'
  return 'how many shapes are there?', NUMBERS[len(objects)]


# ---------------------------------------------------------------- rendering


def _draw(draw: ImageDraw.ImageDraw, o: dict, side: int, fill: tuple) -> None:
  cx, cy, r = o['x'] * side, o['y'] * side, o['r'] * side
  if o['shape'] == 'circle':
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
  elif o['shape'] == 'square':
    h = 0.8 * r
    draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
  elif o['shape'] == 'triangle':
    pts = [(cx + r * np.sin(t), cy - r * np.cos(t)) for t in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
    draw.polygon(pts, fill=fill)
  elif o['shape'] == 'cross':
    h, w = 0.9 * r, 0.3 * r
    draw.rectangle((cx - h, cy - w, cx + h, cy + w), fill=fill)
    draw.rectangle((cx - w, cy - h, cx + w, cy + h), fill=fill)
  else:
    raise DataError(f"shapes: no way to draw shape {o['shape']!r}")


def render(objects: list[dict], size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 [size, size, 3]: a dark noisy background with the objects drawn anti-aliased."""
  side = size * _SUPERSAMPLE
  background = tuple(int(v) for v in rng.integers(0, 45, size=3))
  canvas = Image.new('RGB', (side, side), background)
  draw = ImageDraw.Draw(canvas)
  for o in objects:
    jitter = rng.integers(-15, 16, size=3)
    fill = tuple(int(v) for v in np.clip(np.array(_RGB[o['color']]) + jitter, 0, 255))
    _draw(draw, o, side, fill)
  image = np.asarray(canvas.reduce(_SUPERSAMPLE), np.float32)
  image += rng.normal(0.0, 6.0, size=image.shape).astype(np.float32)
  return np.clip(image, 0, 255).astype(np.uint8)


def make_example(seed: int, split: str, index: int, image_size: int,
                 num_objects: tuple[int, int]) -> dict:
  """The example at `index` of `split`, computed from scratch (the cache stores these)."""
  rng = np.random.default_rng([seed, _SPLITS[split], index])
  objects = sample_scene(rng, num_objects)
  caption, first = describe(objects, rng)
  question, answer = ask(objects, rng)
  return dict(
      image=render(objects, image_size, rng), caption=caption,
      color=COLORS.index(first['color']), shape=SHAPES.index(first['shape']),
      size=SIZES.index(first['size']), num_objects=len(objects),
      question=question, answer=answer, answer_id=ANSWERS.index(answer))


# ---------------------------------------------------------------- source

_INT_KEYS = ('color', 'shape', 'size', 'num_objects', 'answer_id')
_STR_KEYS = ('caption', 'question', 'answer')


def _params(data, split: str) -> dict:
  if split not in _SPLITS:
    raise DataError(f'shapes: unknown split {split!r}; expected one of {sorted(_SPLITS)}')
  lo, hi = (int(v) for v in data.get('num_objects', (1, 3)))
  if not 1 <= lo <= hi <= 3:
    raise DataError(f'data.num_objects={(lo, hi)}: shapes draws 1 to 3 objects per image')
  count = data.get('train_size', 50_000) if split == 'train' else data.get('eval_size', 2_000)
  return dict(version=FORMAT_VERSION, seed=int(data.get('seed', 0)), split=split,
              count=int(count), image_size=int(data.image_size), num_objects=(lo, hi))


def _render_split(p: dict, images_path: pathlib.Path, meta_path: pathlib.Path) -> None:
  logging.info('shapes: rendering %d %s images at %dpx into %s',
               p['count'], p['split'], p['image_size'], images_path)
  tmp = images_path.with_suffix(f'.tmp{os.getpid()}.npy')
  images = np.lib.format.open_memmap(
      tmp, mode='w+', dtype=np.uint8, shape=(p['count'], p['image_size'], p['image_size'], 3))
  columns = {k: [] for k in _INT_KEYS + _STR_KEYS}
  for i in range(p['count']):
    ex = make_example(p['seed'], p['split'], i, p['image_size'], p['num_objects'])
    images[i] = ex['image']
    for k in columns:
      columns[k].append(ex[k])
  images.flush()
  del images
  tmp_meta = meta_path.with_suffix(f'.tmp{os.getpid()}.npz')
  np.savez(tmp_meta, **{k: np.array(v, np.int32 if k in _INT_KEYS else np.str_)
                        for k, v in columns.items()})
  os.replace(tmp_meta, meta_path)  # meta first: images present means both are complete
  os.replace(tmp, images_path)


class ShapesSource:
  """Random access over one pre-rendered split; pickles by path (cheap for grain workers)."""

  # word_tags is a string field (one tag per caption word); its entry is the tag vocabulary.
  label_names = {'color': list(COLORS), 'shape': list(SHAPES), 'size': list(SIZES),
                 'num_objects': list(NUMBERS), 'answer_id': list(ANSWERS),
                 'word_tags': list(WORD_TAGS)}

  def __init__(self, images_path: pathlib.Path, meta_path: pathlib.Path):
    self.images_path = images_path
    with np.load(meta_path) as meta:
      self._meta = {k: meta[k] for k in meta.files}
    self._images = np.load(images_path, mmap_mode='r')
    self.skipped = {}

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict:
    example = {k: int(v[index]) for k, v in self._meta.items() if k in _INT_KEYS}
    example.update({k: str(v[index]) for k, v in self._meta.items() if k in _STR_KEYS})
    example['word_tags'] = ' '.join(word_tags(example['caption']))  # not cached: cheap
    example['image'] = np.array(self._images[index])
    return example

  def texts(self) -> list[str]:
    """Every caption and question of the split (tokenizer training)."""
    return [str(t) for key in ('caption', 'question') for t in self._meta[key]]

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_images'}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._images = np.load(self.images_path, mmap_mode='r')


# The data.* fields that change the captions: the tokenizer's cache key (sources.SOURCES).
CORPUS_FIELDS = ('seed', 'train_size', 'num_objects')


def build(data, split: str) -> ShapesSource:
  """The split's source, rendered on first use into `cache_root(data)/shapes`."""
  p = _params(data, split)
  folder = cache.cache_root(data) / 'shapes'
  folder.mkdir(parents=True, exist_ok=True)
  stem = f"{split}-{p['image_size']}px-{cache.cache_key(p)}"
  images_path, meta_path = folder / f'{stem}.images.npy', folder / f'{stem}.meta.npz'
  if not images_path.exists():
    _render_split(p, images_path, meta_path)
  return ShapesSource(images_path, meta_path)
