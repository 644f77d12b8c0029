"""`files`: the user's own image-text pairs, a JSONL or CSV file plus image files.

Every row is checked when the source is built: a row whose image is missing
or does not decode, whose caption is empty, or whose text is not valid UTF-8, is
skipped and counted with a warning that names the file and line (or, with
on_bad='error', is a DataError). A configured column that no row has (a CSV header
without 'caption', say) is one DataError up front, not a warning per row.
"""

import collections
import csv
import json
import logging
import pathlib
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmjax.data import image_ops
from mmjax.data.errors import DataError

_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)
_BOM = '\ufeff'  # the byte-order mark that spreadsheet programs put before a UTF-8 CSV
# Text is decoded with errors='surrogateescape': a byte that is not UTF-8 becomes one
# of these lone surrogates, so a bad row is found and skipped instead of stopping the file.
_ESCAPED_BYTE = re.compile('[\udc80-\udcff]')


def _encoding_error(text: str, where: str) -> str:
  """'' when `text` decoded cleanly, else 'bad text encoding: ...' naming its first bad byte."""
  match = _ESCAPED_BYTE.search(text)
  if not match:
    return ''
  offset = len(text[:match.start()].encode('utf-8', 'surrogateescape'))
  return (f'bad text encoding: invalid UTF-8 byte 0x{ord(match.group()) - 0xdc00:02x} '
          f'at byte {offset + 1} of {where}')


def _read_jsonl(path: pathlib.Path):
  columns, rows = {}, []  # columns: an ordered set of every key some row has
  with open(path, newline='', encoding='utf-8', errors='surrogateescape') as f:
    for line_no, line in enumerate(f, start=1):
      line = line.removeprefix(_BOM) if line_no == 1 else line
      bad = _encoding_error(line, 'the line')
      if bad:
        rows.append((line_no, bad))
        continue
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        rows.append((line_no, f'unreadable row: {e}'))
        continue
      if not isinstance(row, dict):
        rows.append((line_no, f'unreadable row: a JSON {type(row).__name__}, not an object'))
        continue
      columns.update(dict.fromkeys(row))
      rows.append((line_no, row))
  return list(columns), rows


def _read_csv(path: pathlib.Path):
  # The csv module reads the decoded text, so quoted fields may still span lines;
  # a bad byte is looked for per row, in its fields.
  with open(path, newline='', encoding='utf-8-sig', errors='surrogateescape') as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if not header:
      raise DataError(f'{path}:1: no CSV header line; expected the column names first')
    bad = _encoding_error(','.join(header), 'the header')
    if bad:
      raise DataError(f'{path}:1: {bad}')
    rows = []
    while True:
      line_no = reader.line_num + 1  # where the row starts; line_num is where it ends
      try:
        fields = next(reader)
      except StopIteration:
        break
      except csv.Error as e:  # e.g. a field over csv.field_size_limit()
        rows.append((line_no, f'unreadable row: {e}'))
        continue
      if not fields:
        continue  # a blank line
      bad = next(filter(None, (_encoding_error(v, f'field {name!r}')
                               for name, v in zip(header, fields))), '')
      if bad:
        rows.append((line_no, bad))
      elif len(fields) != len(header):
        rows.append((line_no, f'unreadable row: {len(fields)} fields where the header has '
                              f'{len(header)} (an unquoted comma in a field?)'))
      else:
        rows.append((line_no, dict(zip(header, fields))))
  return header, rows


def read_rows(path: pathlib.Path) -> tuple[list[str], list[tuple[int, dict | str]]]:
  """(columns, rows) of a .jsonl or .csv file.

  Each row is (line number, row dict), or (line number, 'reason: detail') when the row
  cannot be read: bad JSON, invalid UTF-8, a CSV row with too many or too few fields.
  Line numbers are 1-based, where the row starts, as a user's editor shows them.
  `columns` is the CSV header, or every key that some JSONL row has.
  """
  if not path.is_file():
    raise DataError(f'data.path: no such file {path}')
  suffix = path.suffix.lower()
  if suffix in ('.jsonl', '.json'):
    return _read_jsonl(path)
  if suffix == '.csv':
    return _read_csv(path)
  raise DataError(f'{path}: unknown format {suffix!r}; expected .jsonl or .csv')


# Modes whose pixels np.asarray reads in a form image_ops.to_rgb knows; all others are
# converted by PIL first. PIL's own convert('RGB') would clip 16-bit and float grey (a
# 16-bit PNG of mid grey comes out white), so those are always read as arrays.
_DEEP_MODES = ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F')
_ARRAY_MODES = ('L', 'LA', 'RGB', 'RGBA') + _DEEP_MODES
_PREMULTIPLIED = {'La': 'LA', 'RGBa': 'RGBA'}  # PIL converts these to nothing else


def decode_image(path: pathlib.Path) -> np.ndarray:
  """uint8 RGB [H, W, 3], turned upright by its EXIF orientation; raises one of
  _DECODE_ERRORS when the file is not a readable image."""
  with Image.open(path) as image:
    return image_to_rgb(ImageOps.exif_transpose(image))  # exif_transpose: a loaded copy


def image_to_rgb(image: Image.Image) -> np.ndarray:
  """A PIL image of any mode -> uint8 RGB [H, W, 3] of the same brightness.

  16-bit, 32-bit and float grey are scaled as `image_ops.to_uint8` says (16-bit: the
  high byte); 1-bit, palette, CMYK, YCbCr, LAB and HSV are converted by PIL; transparency
  (an alpha band, or a palette or colour key 'transparency') is composited onto white
  (`image_ops.BACKGROUND`). A colour key on 16-bit grey is ignored.
  """
  if image.mode in _PREMULTIPLIED:
    image = image.convert(_PREMULTIPLIED[image.mode])
  elif image.mode not in _DEEP_MODES and (
      image.mode not in _ARRAY_MODES or 'transparency' in image.info):
    transparent = image.mode in ('LA', 'PA', 'RGBA') or 'transparency' in image.info
    image = image.convert('RGBA' if transparent else 'RGB')
  return image_ops.to_rgb(np.asarray(image))


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
    columns, rows = read_rows(self.path)
    self._check_columns(columns, image_key=image_key, text_key=text_key, label_key=label_key)
    for line_no, row in rows:
      entry, reason = (None, row) if isinstance(row, str) else self._check(row, image_key)
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
                      len(rows), ', '.join(f'{k}: {v}' for k, v in self.skipped.items()))
    if not self.rows:
      raise DataError(f'{self.path}: no valid rows (of {len(rows)}); see the warnings above')
    self.skipped = dict(self.skipped)
    self.label_names = {}
    if label_key:
      top = max(r[label_key] for r in self.rows)
      self.label_names[label_key] = [str(i) for i in range(top + 1)]

  def _check_columns(self, columns, **keys):
    """One error for a configured key that no row has (a misnamed column), instead of a
    warning per row. `columns` is empty when no JSONL row was readable: the per-row
    warnings say why."""
    for field, key in keys.items():
      if not key or not columns or key in columns:
        continue
      if self.path.suffix.lower() == '.csv':
        raise DataError(f'{self.path}:1: the header has no {key!r} column (data.{field}); '
                        f'its columns: {columns}')
      raise DataError(f'{self.path}: no row has a {key!r} field (data.{field}); '
                      f'the rows have: {columns}')

  def _check(self, row, image_key) -> tuple[dict | None, str]:
    """(entry, '') for a good row, else (None, 'reason: detail')."""
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


# The data.* fields that change the captions: the tokenizer's cache key (sources.SOURCES).
CORPUS_FIELDS = ('path', 'text_key', 'image_key', 'image_dir', 'label_key')


def build(data, split: str) -> FilesSource:
  return FilesSource(
      path=data.path.replace('{split}', split), image_dir=data.get('image_dir', '').replace('{split}', split),
      image_key=data.get('image_key', 'image') or 'image',
      text_key=data.get('text_key', 'caption') or 'caption',
      label_key=data.get('label_key', ''), on_bad=data.get('on_bad', 'skip'))
