"""`folder`: a user's labelled images as a folder per class, `root/<class name>/<image>`.

The layout of torchvision's ImageFolder: class names are the sorted class-folder names of
the train split, and a label is the index of its class in them. The splits are
`root/train/` and `root/test/` (or `root/val/`) when both are there, else a seeded split
of `root` stratified by class (`data.test_fraction` of each class held out for test).
The caption of an image is its class name with '_' and '-' as spaces, so the tokenizer
and the pipeline read this source as they read the others.

Every image is decoded once when the source is built: one that does not decode is skipped
with a warning naming it (or, with on_bad='error', is a DataError). A class folder with
no images is skipped with a warning naming it; files that are not images by their
extension are counted and reported in one warning per folder.
"""

import collections
import difflib
import logging
import pathlib

import numpy as np

from mmjax.data.errors import DataError
from mmjax.data.files import (DECODE_ERRORS, MAX_CLASSES, decode_image, read_test_fraction,
                              split_mask)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def split_folders(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
  """(train folder, test folder) when `root` holds train/ and test/ or val/ (test/ first),
  else (root, None): one folder to split."""
  train = root / 'train'
  for held_out in (root / 'test', root / 'val'):
    if train.is_dir() and held_out.is_dir():
      return train, held_out
  return root, None


def _class_folders(folder: pathlib.Path) -> list[pathlib.Path]:
  """The sorted sub-folders of `folder`, hidden ones (.ipynb_checkpoints) left out."""
  classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith('.'))
  if len(classes) > MAX_CLASSES:
    raise DataError(f'{folder}: {len(classes):,} class folders, more than the '
                    f'{MAX_CLASSES:,} supported (is data.path the folder of the classes?)')
  return classes


def scan(folder: pathlib.Path, warn: bool = True):
  """({class name: its image files, sorted}, {skip reason: count}) of `folder`'s classes.

  Files are found at any depth of a class folder and counted as images by their extension
  alone (any case); a class folder without one is left out. With `warn`, each skip is
  logged; without, the same folder is only being read for its class names.
  """
  classes, skipped, others = {}, collections.Counter(), []
  for class_folder in _class_folders(folder):
    files = sorted(p for p in class_folder.rglob('*') if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    others += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if images:
      classes[class_folder.name] = images
      continue
    skipped['empty class folder'] += 1
    if warn:
      logging.warning('%s: skipped class folder %r: %s', folder, class_folder.name,
                      f'no image files among its {len(files)}' if files else 'it is empty')
  if others:
    skipped['not an image file'] = len(others)
    if warn:
      logging.warning('%s: skipped %d files that are not images by their extension (%s, ...); '
                      'images end in %s', folder, len(others), others[0],
                      ' '.join(IMAGE_EXTENSIONS))
  return classes, skipped


def _check_classes(names: list[str], folder: pathlib.Path, skipped) -> None:
  if len(names) >= 2:
    return
  found = f'one class folder {names[0]!r}' if names else 'no class folder with images'
  if skipped.get('empty class folder'):
    found += f' ({skipped["empty class folder"]} more without images)'
  hint = ("; for a train/test layout, put a test/ or val/ folder beside train/"
          if names == ['train'] else '')
  raise DataError(f'a classifier needs at least 2 classes; {folder} has {found}{hint}')


def _check_known(classes, names: list[str], folder: pathlib.Path, train: pathlib.Path) -> None:
  """A DataError for a test class that the train split lacks: no label id could mean it."""
  known = set(names)
  for name in classes:
    if name not in known:
      near = difflib.get_close_matches(name, names, n=1)
      hint = f'; did you mean {near[0]!r}?' if near else ''
      raise DataError(f'{folder}: class folder {name!r} has no images in {train}, so the '
                      f'model has no label for it{hint}')


def _labelled(classes, names: list[str]) -> list[tuple[pathlib.Path, int]]:
  """[(image path, label id)] of {class name: image paths}, by class then path."""
  ids = {name: i for i, name in enumerate(names)}
  return [(p, ids[name]) for name in sorted(classes) for p in classes[name]]


def _folder_split(train: pathlib.Path, folder: pathlib.Path):
  """(labelled images, class names, skip counts) of `folder`, train/ or test/, with the
  class names of `train`."""
  classes, skipped = scan(folder)
  train_classes = classes if folder == train else scan(train, warn=False)[0]
  names = sorted(train_classes)
  _check_classes(names, train, skipped if folder == train else {})
  _check_known(classes, names, folder, train)
  return _labelled(classes, names), names, skipped


def _stratified_split(root: pathlib.Path, split: str, test_fraction: float, seed: int):
  """(labelled images, class names, skip counts) of `split`'s part of a seeded split of
  `root`, stratified by class. Both splits read the whole folder; what is left out of
  both is reported, and counted, by the train split alone."""
  if split != 'train' and not test_fraction:
    raise DataError(f'{root}: no {split} split: data.test_fraction=0 and no train/ and '
                    'test/ (or val/) folders in it')
  classes, skipped = scan(root, warn=split == 'train')
  names = sorted(classes)
  _check_classes(names, root, skipped)
  every = [(name, p) for name in names for p in classes[name]]
  held_out = split_mask([name for name, _ in every], test_fraction, seed)
  part = collections.defaultdict(list)
  for (name, image_path), out in zip(every, held_out):
    if out == (split != 'train'):
      part[name].append(image_path)
  return _labelled(part, names), names, skipped if split == 'train' else {}


def _readable(files, on_bad: str) -> list[tuple[pathlib.Path, int]]:
  """The (image path, label) of `files` whose image decodes; each other one is warned
  about, or with on_bad='error' is a DataError."""
  readable = []
  for image_path, label in files:
    try:
      decode_image(image_path)
    except DECODE_ERRORS as e:
      if on_bad == 'error':
        raise DataError(f'{image_path}: image does not decode ({e})') from None
      logging.warning('%s: skipped: image does not decode (%s)', image_path, e)
      continue
    readable.append((image_path, label))
  return readable


class FolderSource:
  """The images of one split, decoded on each access; `labels` int32 [N] in memory (for a
  stratified `data.train_examples`), `skipped` counts what was left out, by reason."""

  def __init__(self, path, split: str, label_key='label', test_fraction=0.2, seed=0,
               on_bad='skip'):
    if on_bad not in ('skip', 'error'):
      raise DataError(f"data.on_bad={on_bad!r}: expected 'skip' or 'error'")
    if not label_key:
      raise DataError('data.label_key is empty: the folder source needs a field name for '
                      'its labels')
    if split not in ('train', 'test', 'val'):
      raise DataError(f"folder: no split {split!r}; expected 'train' or 'test' (or 'val')")
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
      raise DataError(f'data.path: {root} is not a folder' if root.exists() else
                      f'data.path: no such folder {root}')
    self.label_key = label_key
    train, test = split_folders(root)
    if test is not None:
      files, names, skipped = _folder_split(train, train if split == 'train' else test)
    else:
      files, names, skipped = _stratified_split(root, split, test_fraction, seed)
    self.items = _readable(files, on_bad)  # (image path, label id)
    if not self.items:
      raise DataError(f'{root}: no readable images in the {split} split; see the warnings above'
                      if files else f'{root}: the {split} split has no images')
    self.skipped = dict(skipped)  # reason -> count
    if len(self.items) < len(files):
      self.skipped['image does not decode'] = len(files) - len(self.items)
    self.label_names = {label_key: names}
    self.labels = np.array([label for _, label in self.items], np.int32)
    self.captions = [n.replace('_', ' ').replace('-', ' ') for n in names]

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i: int) -> dict:
    image_path, label = self.items[i]
    return {'image': decode_image(image_path), 'caption': self.captions[label],
            self.label_key: label, 'image_path': str(image_path)}

  def texts(self) -> list[str]:
    return [self.captions[label] for label in self.labels]


# The data.* fields that change the captions: the tokenizer's cache key (sources.SOURCES).
CORPUS_FIELDS = ('path', 'test_fraction', 'seed')


def build(data, split: str) -> FolderSource:
  return FolderSource(data.path, split, label_key=data.get('label_key', 'label'),
                      test_fraction=read_test_fraction(data, 0.2),
                      seed=int(data.get('seed', 0)), on_bad=data.get('on_bad', 'skip'))
