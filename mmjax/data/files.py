"""`files`: the user's own image-text pairs, a JSONL or CSV file plus image files.

Every row is checked when the source is built: a row whose image is missing
or does not decode, or whose caption is empty, is skipped and counted with a
warning that names the file and line (or, with on_bad='error', is a DataError).
"""

import collections
import csv
import json
import logging
import pathlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmjax.data.errors import DataError

_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def read_rows(path: pathlib.Path):
  """Yields (line number, row dict); the line number is 1-based in the file as a user sees it."""
  if not path.is_file():
    raise DataError(f'data.path: no such file {path}')
  suffix = path.suffix.lower()
  with open(path, newline='', encoding='utf-8') as f:
    if suffix in ('.jsonl', '.json'):
      for line_no, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          yield line_no, e
          continue
        yield line_no, row if isinstance(row, dict) else TypeError('not a JSON object')
    elif suffix == '.csv':
      reader = csv.DictReader(f)
      for row in reader:
        yield reader.line_num, row
    else:
      raise DataError(f'{path}: unknown format {suffix!r}; expected .jsonl or .csv')


def decode_image(path: pathlib.Path) -> np.ndarray:
  """uint8 RGB [H, W, 3]; raises one of _DECODE_ERRORS when the file is not a readable image."""
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'))


class FilesSource:
  """Valid rows only; `skipped` counts the others by reason, `skipped_rows` lists them."""

  def __init__(self, path, image_dir='', image_key='image', text_key='caption',
               label_key='', on_bad='skip'):
    if on_bad not in ('skip', 'error'):
      raise DataError(f"data.on_bad={on_bad!r}: expected 'skip' or 'error'")
    self.path = pathlib.Path(path).expanduser()
    self.image_dir = pathlib.Path(image_dir).expanduser() if image_dir else self.path.parent
    self.text_key, self.label_key = text_key, label_key
    self.skipped = collections.Counter()
    self.skipped_rows = []  # (file, line, reason)
    self.rows = []  # {image_path, caption[, label]} for the valid rows
    total = 0
    for line_no, row in read_rows(self.path):
      total += 1
      entry, reason = self._check(row, image_key)
      if entry is None:
        where = f'{self.path}:{line_no}'
        if on_bad == 'error':
          raise DataError(f'{where}: {reason}')
        logging.warning('%s: skipped: %s', where, reason)
        self.skipped[reason.split(':')[0]] += 1
        self.skipped_rows.append((str(self.path), line_no, reason))
      else:
        self.rows.append(entry)
    if self.skipped_rows:
      logging.warning('%s: skipped %d of %d rows (%s)', self.path, len(self.skipped_rows),
                      total, ', '.join(f'{k}: {v}' for k, v in self.skipped.items()))
    if not self.rows:
      raise DataError(f'{self.path}: no valid rows (of {total}); see the warnings above')
    self.skipped = dict(self.skipped)
    self.label_names = {}
    if label_key:
      top = max(r[label_key] for r in self.rows)
      self.label_names[label_key] = [str(i) for i in range(top + 1)]

  def _check(self, row, image_key) -> tuple[dict | None, str]:
    """(entry, '') for a good row, else (None, 'reason: detail')."""
    if isinstance(row, Exception):
      return None, f'unreadable row: {row}'
    if not row.get(image_key):
      return None, f'missing image: no {image_key!r} field'
    caption = row.get(self.text_key)
    if not isinstance(caption, str) or not caption.strip():
      return None, f'empty caption: field {self.text_key!r} is empty or missing'
    image_path = self.image_dir / str(row[image_key])
    if not image_path.is_file():
      return None, f'image not found: {image_path}'
    try:
      decode_image(image_path)
    except _DECODE_ERRORS as e:
      return None, f'image does not decode: {image_path} ({e})'
    entry = dict(image_path=str(image_path), caption=caption.strip())
    if self.label_key:
      try:
        label = int(row.get(self.label_key))
      except (TypeError, ValueError):
        return None, f'bad label: field {self.label_key!r} = {row.get(self.label_key)!r} is not an integer'
      if label < 0:
        return None, f'bad label: field {self.label_key!r} = {label} is negative'
      entry[self.label_key] = label
    return entry, ''

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> dict:
    return dict(self.rows[i], image=decode_image(pathlib.Path(self.rows[i]['image_path'])))

  def texts(self) -> list[str]:
    return [r['caption'] for r in self.rows]


def build(data, split: str) -> FilesSource:
  return FilesSource(
      path=data.path.replace('{split}', split), image_dir=data.get('image_dir', '').replace('{split}', split),
      image_key=data.get('image_key', 'image') or 'image',
      text_key=data.get('text_key', 'caption') or 'caption',
      label_key=data.get('label_key', ''), on_bad=data.get('on_bad', 'skip'))
