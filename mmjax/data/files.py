"""`files`: the user's own image-text pairs, a JSONL or CSV file plus image files, or
plain text: a .txt file holds one text (a document, for a language model) per line.

Every row is checked when the source is built: a row whose image is missing
or does not decode, whose caption or label is empty, or whose text is not valid UTF-8,
is skipped and counted with a warning that names the file and line (or, with
on_bad='error', is a DataError). A configured column that no row has (a CSV header
without 'caption', say) is one DataError up front, not a warning per row.

Labels (`data.label_key`) may be integers or names ("cat"); `data.image_key=''` is a
text-only file (a text classifier); `data.test_fraction` > 0 splits one file into train
and test, stratified by label.
"""

import collections
import csv
import json
import logging
import math
import pathlib
import re
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmjax.data import image_ops
from mmjax.data.errors import DataError

DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)
_BOM = '\ufeff'  # the byte-order mark that spreadsheet programs put before a UTF-8 CSV
# Text is decoded with errors='surrogateescape': a byte that is not UTF-8 becomes one
# of these lone surrogates, so a bad row is found and skipped instead of stopping the file.
_ESCAPED_BYTE = re.compile('[\udc80-\udcff]')
MAX_CLASSES = 10_000  # labels or class folders; more is almost surely a wrong column
_INTEGER = re.compile(r'[+-]?[0-9]+')  # a label that is an integer ("3" in a CSV too)


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


def _read_txt(path: pathlib.Path, text_key: str):
  rows = []
  with open(path, newline='', encoding='utf-8', errors='surrogateescape') as f:
    for line_no, line in enumerate(f, start=1):
      line = line.removeprefix(_BOM) if line_no == 1 else line
      bad = _encoding_error(line, 'the line')
      if bad:
        rows.append((line_no, bad))
      elif line.strip():
        rows.append((line_no, {text_key: line.strip()}))
  return [text_key], rows


def read_rows(path: pathlib.Path, text_key: str = 'text'
              ) -> tuple[list[str], list[tuple[int, dict | str]]]:
  """(columns, rows) of a .jsonl or .csv file, or of a .txt file (one row per non-blank
  line, its text under `text_key`).

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
  if suffix == '.txt':
    return _read_txt(path, text_key)
  raise DataError(f'{path}: unknown format {suffix!r}; expected .jsonl, .csv or .txt')


# Modes whose pixels np.asarray reads in a form image_ops.to_rgb knows; all others are
# converted by PIL first. PIL's own convert('RGB') would clip 16-bit and float grey (a
# 16-bit PNG of mid grey comes out white), so those are always read as arrays.
_DEEP_MODES = ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F')
_ARRAY_MODES = ('L', 'LA', 'RGB', 'RGBA') + _DEEP_MODES
_PREMULTIPLIED = {'La': 'LA', 'RGBa': 'RGBA'}  # PIL converts these to nothing else


def decode_image(path: pathlib.Path) -> np.ndarray:
  """uint8 RGB [H, W, 3], turned upright by its EXIF orientation; raises one of
  DECODE_ERRORS when the file is not a readable image."""
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
  """Valid rows only; `skipped` counts the others by reason, `skipped_rows` lists them.

  Labels (`label_key`) are integers when every label of the train split's file is one
  ("3" in a CSV counts), and named otherwise: the sorted distinct label texts of that
  file, whose index is the id. `label_file` is that file (`path` when not given), so a
  test split's ids are the train split's. `image_key=''` reads no images (text only).
  With `test_fraction` > 0, only `split`'s part of a seeded stratified split of the rows.
  A .txt file is text only: each line is a row's `text_key`, and `image_key` is ignored.
  """

  def __init__(self, path, image_dir='', image_key='image', text_key='caption',
               label_key='', on_bad='skip', label_file=None, split='train',
               test_fraction=0.0, seed=0):
    if on_bad not in ('skip', 'error'):
      raise DataError(f"data.on_bad={on_bad!r}: expected 'skip' or 'error'")
    self.path = pathlib.Path(path).expanduser()
    if self.path.suffix.lower() == '.txt':
      image_key = ''
    self.image_dir = pathlib.Path(image_dir).expanduser() if image_dir else self.path.parent
    self.image_key, self.text_key, self.label_key = image_key, text_key, label_key
    self.skipped = collections.Counter()
    self.skipped_rows = []  # (file, line, reason)
    self.rows = []  # {[image_path,] caption[, label]} for the valid rows
    columns, rows = read_rows(self.path, text_key)
    self._check_columns(columns, image_key=image_key, text_key=text_key, label_key=label_key)
    names, self._ids = None, None  # label name -> id, when the labels are names
    if label_key:
      label_file = pathlib.Path(label_file).expanduser() if label_file else self.path
      names = self._label_vocabulary(label_file, rows)
      self._ids = None if names is None else {name: i for i, name in enumerate(names)}
    if test_fraction:
      rows = self._split_part(rows, split, test_fraction, seed)
    for line_no, row in rows:
      where = f'{self.path}:{line_no}'
      entry, reason = (None, row) if isinstance(row, str) else self._check(row, where)
      if entry is None:
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
      self.labels = np.array([r[label_key] for r in self.rows], np.int32)
      if names is None:  # integer labels: as many classes as the largest label says
        _check_class_count(int(self.labels.max()) + 1, f'{self.path}: column {label_key!r}')
        names = [str(i) for i in range(self.labels.max() + 1)]
      self.label_names[label_key] = names

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

  def _label_vocabulary(self, label_file: pathlib.Path, rows) -> list[str] | None:
    """None when every label in `label_file` is an integer, else its sorted distinct labels.

    Read from every readable row of the train split's file, whether or not its image
    decodes, so that the train and test sources agree without decoding each other's images.
    """
    if label_file != self.path:
      if not label_file.is_file():
        raise DataError(f'{self.path}: its labels are named by the train split\'s file '
                        f'{label_file}, which does not exist')
      rows = read_rows(label_file, self.text_key)[1]
    first_line = {}  # label text -> the line it first appears on
    for line_no, row in rows:
      if isinstance(row, dict):
        first_line.setdefault(_label_text(row.get(self.label_key)), line_no)
    first_line.pop('', None)
    named = [t for t in first_line if not _INTEGER.fullmatch(t)]
    if not named:
      return None
    _check_class_count(len(first_line), f'{label_file}: column {self.label_key!r}')
    if len(named) < len(first_line):  # a stray name turns numbers into names, sorted as text
      logging.warning('%s:%d: label %r is not an integer, so every label of column %r is a '
                      'name; ids index the sorted names, in which "10" comes before "2"',
                      label_file, first_line[named[0]], named[0], self.label_key)
    return sorted(first_line)

  def _split_part(self, rows, split: str, test_fraction: float, seed: int):
    """The rows of `split` in a split stratified by label (unreadable rows included, so
    each is warned about by one split only)."""
    if split not in ('train', 'test', 'val'):
      raise DataError(f"{self.path}: data.test_fraction splits the file into 'train' and "
                      f"'test' (or 'val'); there is no split {split!r}")
    groups = [_label_text(row.get(self.label_key)) if self.label_key and isinstance(row, dict)
              else '' for _, row in rows]
    held_out = split_mask(groups, test_fraction, seed)
    return [row for row, out in zip(rows, held_out) if out == (split != 'train')]

  def _label(self, row, where: str) -> tuple[int | None, str]:
    """(label id, '') or (None, 'reason: detail'). A name the train split's file lacks is a
    DataError: no id could mean it, and skipping would hide a mismatched file."""
    text = _label_text(row.get(self.label_key))
    if not text:
      return None, f'missing label: field {self.label_key!r} is empty or missing'
    if self._ids is not None:
      if text not in self._ids:
        raise DataError(f'{where}: label {text!r} is not among the {len(self._ids)} labels '
                        "of the train split's file")
      return self._ids[text], ''
    if not _INTEGER.fullmatch(text):
      return None, f'bad label: field {self.label_key!r} = {text!r} is not an integer'
    if int(text) < 0:
      return None, f'bad label: field {self.label_key!r} = {int(text)} is negative'
    return int(text), ''

  def _check(self, row, where: str) -> tuple[dict | None, str]:
    """(entry, '') for a good row, else (None, 'reason: detail')."""
    image_key = self.image_key
    if image_key and not row.get(image_key):
      return None, f'missing image: no {image_key!r} field'
    caption = row.get(self.text_key)
    if not isinstance(caption, str) or not caption.strip():
      return None, f'empty caption: field {self.text_key!r} is empty or missing'
    entry = dict(caption=caption.strip())
    if self.label_key:
      label, reason = self._label(row, where)
      if reason:
        return None, reason
      entry[self.label_key] = label
    if image_key:
      image_path = self.image_dir / str(row[image_key])
      if not image_path.is_file():
        return None, f'image not found: {image_path}'
      try:
        decode_image(image_path)
      except DECODE_ERRORS as e:
        return None, f'image does not decode: {image_path} ({e})'
      entry['image_path'] = str(image_path)
    return entry, ''

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> dict:
    row = self.rows[i]
    if 'image_path' not in row:
      return dict(row)
    return dict(row, image=decode_image(pathlib.Path(row['image_path'])))

  def texts(self) -> list[str]:
    return [r['caption'] for r in self.rows]


def _label_text(value) -> str:
  """A row's label as text: '' when missing, 3 and "3" alike as '3'."""
  return '' if value is None else str(value).strip()


def _check_class_count(count: int, what: str) -> None:
  if count > MAX_CLASSES:
    raise DataError(f'{what}: {count:,} classes, more than the {MAX_CLASSES:,} supported '
                    '(is it the label column?)')


def split_mask(groups, test_fraction: float, seed: int) -> np.ndarray:
  """bool [N]: which of N items a seeded split stratified by `groups` holds out for test.

  Each group holds out round(n * test_fraction) of its n items, at least one when n >= 2
  and at most n - 1, so every group keeps a train item and any group of two or more
  has a test one. Each group is shuffled by a generator seeded with (seed, its name):
  adding a class does not move another's items between the splits.
  """
  members = collections.defaultdict(list)
  for i, group in enumerate(groups):
    members[group].append(i)
  held_out = np.zeros(len(groups), bool)
  for group, items in members.items():
    n = len(items)
    count = min(n - 1, max(1, math.floor(n * test_fraction + 0.5))) if test_fraction else 0
    rng = np.random.default_rng([seed, zlib.crc32(group.encode('utf-8', 'surrogateescape'))])
    held_out[rng.permutation(items)[:count]] = True
  return held_out


def read_test_fraction(data, default: float = 0.0) -> float:
  """`data.test_fraction`, checked to lie in [0, 1)."""
  fraction = data.get('test_fraction', default)
  if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not (
      0 <= fraction < 1):
    raise DataError(f'data.test_fraction={fraction!r}: expected a number in [0, 1)')
  return float(fraction)


# The data.* fields that change the captions: the tokenizer's cache key (sources.SOURCES).
CORPUS_FIELDS = ('path', 'text_key', 'image_key', 'image_dir', 'label_key', 'test_fraction',
                 'seed')


def build(data, split: str) -> FilesSource:
  path, fraction = data.path, read_test_fraction(data)
  if fraction and '{split}' in path:
    raise DataError(f'data.test_fraction={fraction} splits one file, but data.path={path!r} '
                    'names a file per split; set one of them')
  return FilesSource(
      path=path.replace('{split}', split),
      image_dir=data.get('image_dir', '').replace('{split}', split),
      image_key=data.get('image_key', 'image'),  # '': a text-only file
      text_key=data.get('text_key', 'caption') or 'caption',
      label_key=data.get('label_key', ''), on_bad=data.get('on_bad', 'skip'),
      label_file=path.replace('{split}', 'train'), split=split, test_fraction=fraction,
      seed=int(data.get('seed', 0)))
