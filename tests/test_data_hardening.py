"""Users' data that used to stop or fool a run: bad text encoding, unusual image modes,
misnamed columns, sources built more than once, misspelt options."""

import json
import logging
import os
import struct
import subprocess
import sys
import zlib

import ml_collections
import numpy as np
from PIL import Image
import pytest

from mmjax import data as mmdata
from mmjax.data import files, image_ops, tokenizer as tokenizer_lib
from mmjax.data.errors import DataError

from conftest import ROOT


def _grey_png(folder, name='a.png', value=120):
  Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(folder / name)
  return name


def _files_config(path, **overrides):
  return ml_collections.ConfigDict(dict(name='files', path=str(path), **overrides))


# ---------------------------------------------------------------- text encoding


def _rows_with_bad_bytes(tmp_path, fmt):
  """good, a caption with byte 0xff, good (a CSV caption over two lines); and the line
  numbers of the bad row and the last row."""
  _grey_png(tmp_path)
  path = tmp_path / f'rows.{fmt}'
  if fmt == 'jsonl':
    path.write_bytes(b'{"image": "a.png", "caption": "a cat"}\n'
                     b'{"image": "a.png", "caption": "caf\xff"}\n'
                     b'{"image": "a.png", "caption": "a dog"}\n')
    return path, 2, 3
  path.write_bytes(b'image,caption\r\n'
                   b'a.png,a cat\r\n'
                   b'a.png,caf\xff\r\n'
                   b'a.png,"a dog\r\non two lines"\r\n')
  return path, 3, 4


@pytest.mark.parametrize('fmt', ['jsonl', 'csv'])
def test_invalid_utf8_row_is_skipped_with_file_and_line(tmp_path, caplog, fmt):
  path, bad_line, _ = _rows_with_bad_bytes(tmp_path, fmt)
  with caplog.at_level(logging.WARNING):
    source = mmdata.build_source(_files_config(path), 'train')
  assert source.texts() == ['a cat', 'a dog\r\non two lines' if fmt == 'csv' else 'a dog']
  assert source.skipped == {'bad text encoding': 1}
  (_, line, reason), = source.skipped_rows
  assert line == bad_line
  # The byte's place: in the JSONL line, or in the CSV field.
  where = 'byte 35 of the line' if fmt == 'jsonl' else "byte 4 of field 'caption'"
  assert reason == f'bad text encoding: invalid UTF-8 byte 0xff at {where}'
  assert f'{path}:{bad_line}: skipped: bad text encoding' in caplog.text


@pytest.mark.parametrize('fmt', ['jsonl', 'csv'])
def test_invalid_utf8_with_on_bad_error_names_file_and_line(tmp_path, fmt):
  path, bad_line, _ = _rows_with_bad_bytes(tmp_path, fmt)
  with pytest.raises(DataError, match=rf'{path}:{bad_line}: bad text encoding: invalid UTF-8'):
    mmdata.build_source(_files_config(path, on_bad='error'), 'train')


def test_csv_header_with_invalid_utf8_is_an_error(tmp_path):
  path = tmp_path / 'rows.csv'
  path.write_bytes(b'image,capti\xe9n\na.png,a cat\n')  # Latin-1, not UTF-8
  with pytest.raises(DataError, match=rf'{path}:1: bad text encoding: invalid UTF-8 byte '
                                      r'0xe9 at byte 12 of the header'):
    mmdata.build_source(_files_config(path), 'train')


def test_csv_line_numbers_are_where_a_multiline_row_starts(tmp_path):
  _grey_png(tmp_path)
  path = tmp_path / 'rows.csv'
  path.write_text('image,caption\n'
                  'a.png,"a caption\nover two lines"\n'
                  '\n'
                  'gone.png,missing\n'
                  'a.png,an unquoted, comma\n', encoding='utf-8')
  source = mmdata.build_source(_files_config(path), 'train')
  assert source.texts() == ['a caption\nover two lines']
  assert [(line, reason.split(':')[0]) for _, line, reason in source.skipped_rows] == [
      (5, 'image not found'), (6, 'unreadable row')]
  assert '3 fields where the header has 2' in source.skipped_rows[1][2]


@pytest.mark.parametrize('fmt', ['jsonl', 'csv'])
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_row(tmp_path, fmt):
  _grey_png(tmp_path)
  path = tmp_path / f'rows.{fmt}'
  text = ('{"image": "a.png", "caption": "caf\u00e9"}\n' if fmt == 'jsonl'
          else 'image,caption\na.png,caf\u00e9\n')
  path.write_text('\ufeff' + text, encoding='utf-8')
  source = mmdata.build_source(_files_config(path, on_bad='error'), 'train')
  assert source.texts() == ['caf\u00e9']


# ---------------------------------------------------------------- image modes


def _png_16bit(path, values: np.ndarray):
  """A 16-bit-per-channel RGB ([H, W, 3]) or RGBA ([H, W, 4]) PNG, which PIL cannot write."""
  height, width, channels = values.shape
  rows = values.astype('>u2').reshape(height, -1)
  raw = b''.join(b'\0' + row.tobytes() for row in rows)  # filter type 0 on each row

  def chunk(kind, body):
    return struct.pack('>I', len(body)) + kind + body + struct.pack(
        '>I', zlib.crc32(kind + body) & 0xffffffff)

  header = struct.pack('>IIBBBBB', width, height, 16, {3: 2, 4: 6}[channels], 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) +
                   chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def _palette(alpha=None):
  """A 'P' image, left half index 0 = (10, 20, 30), right half index 1 = black; index 0
  fully transparent when `alpha` is set."""
  image = Image.fromarray(np.repeat([[0] * 4 + [1] * 4], 6, axis=0).astype(np.uint8), 'P')
  image.putpalette([10, 20, 30, 0, 0, 0])
  if alpha is not None:
    image.info['transparency'] = alpha
  return image


def _full(mode, value, shape=(6, 8)):
  return Image.fromarray(np.full(shape, value, {'I': np.int32, 'F': np.float32}.get(
      mode, np.uint8)), mode)


HALF = np.repeat([[False] * 4 + [True] * 4], 6, axis=0)  # [6, 8], right half set

# (name, PIL image, file format, expected per-channel mean). Colour means are of R, G, B.
MODES = [
    ('1', Image.fromarray(HALF), 'PNG', (127.5,) * 3),
    ('L', _full('L', 100), 'PNG', (100,) * 3),
    ('P', _palette(), 'PNG', (5, 10, 15)),
    ('P transparent', _palette(alpha=0), 'PNG', (127.5,) * 3),  # index 0 -> white
    ('PA', Image.merge('PA', [_palette(), _full('L', 0)]), 'TIFF', (255,) * 3),
    ('LA', Image.merge('LA', [_full('L', 0), _full('L', 51)]), 'PNG', (204,) * 3),
    ('RGBA', Image.fromarray(np.full((6, 8, 4), (200, 0, 0, 51), np.uint8)), 'PNG',
     (244, 204, 204)),  # 20% red over white
    ('RGBA clear', Image.fromarray(np.full((6, 8, 4), (200, 0, 0, 0), np.uint8)), 'PNG',
     (255,) * 3),
    ('CMYK', Image.fromarray(np.full((6, 8, 4), (0, 255, 255, 0), np.uint8), 'CMYK'), 'TIFF',
     (255, 0, 0)),
    ('YCbCr', Image.fromarray(np.full((6, 8, 3), (128, 128, 128), np.uint8), 'YCbCr'), 'TIFF',
     (128,) * 3),
    ('I;16', Image.fromarray(np.full((6, 8), 32768, np.uint16)), 'PNG', (128,) * 3),
    ('I;16B', _full('I', 32768).convert('I;16B'), 'TIFF', (128,) * 3),
    ('I 16-bit', _full('I', 32768), 'TIFF', (128,) * 3),
    ('I 32-bit', Image.fromarray(np.where(HALF, 1 << 20, 1 << 19).astype(np.int32)), 'TIFF',
     ((255 + 127) / 2,) * 3),  # scaled by its max
    ('F [0, 1]', _full('F', 0.5), 'TIFF', (128,) * 3),
    ('F 0..255', Image.fromarray(np.where(HALF, 300.0, 100.0).astype(np.float32)), 'TIFF',
     ((100 + 255) / 2,) * 3),  # clipped at 255
]


@pytest.mark.parametrize('name, image, fmt, expected', MODES, ids=[m[0] for m in MODES])
def test_every_image_mode_decodes_to_its_brightness(tmp_path, name, image, fmt, expected):
  path = tmp_path / f'image.{fmt.lower()}'
  image.save(path, fmt)
  with Image.open(path) as reopened:
    assert reopened.mode == name.split()[0], 'the test must exercise this mode'
  rgb = files.decode_image(path)
  assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
  np.testing.assert_allclose(rgb.mean(axis=(0, 1)), expected, atol=1.0)


@pytest.mark.parametrize('mode, pixel', [('La', (64, 128)), ('RGBa', (64, 64, 64, 128))])
def test_premultiplied_alpha_is_composited(mode, pixel):
  image = Image.frombytes(mode, (8, 6), bytes(pixel) * 48)
  rgb = files.image_to_rgb(image)
  # 64 premultiplied by alpha 128 is 127 at half cover, over white: 127 / 2 + 255 / 2
  np.testing.assert_allclose(rgb.mean(axis=(0, 1)), (191,) * 3, atol=1.5)


@pytest.mark.parametrize('channels, expected', [(3, (128, 64, 128)), (4, (128, 64, 128))])
def test_16bit_rgb_png_keeps_its_brightness(tmp_path, channels, expected):
  pixel = (32768, 16384, 32768, 65535)[:channels]
  _png_16bit(tmp_path / 'deep.png', np.full((6, 8, channels), pixel, np.uint16))
  rgb = files.decode_image(tmp_path / 'deep.png')
  assert rgb.shape == (6, 8, 3)
  np.testing.assert_allclose(rgb.mean(axis=(0, 1)), expected, atol=1.0)


def test_exif_orientation_turns_the_image_upright(tmp_path):
  array = np.zeros((4, 8, 3), np.uint8)
  array[:, :4] = 255  # the left half, as stored
  image = Image.fromarray(array)
  exif = image.getexif()
  exif[0x0112] = 6  # Orientation: shown turned 90 degrees clockwise
  image.save(tmp_path / 'turned.png', exif=exif)
  rgb = files.decode_image(tmp_path / 'turned.png')
  assert rgb.shape == (8, 4, 3)
  assert rgb[:4].min() == 255 and rgb[4:].max() == 0  # the stored left is now on top


def test_a_truncated_image_is_a_skipped_row(tmp_path):
  _grey_png(tmp_path)
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(noise).save(tmp_path / 'whole.png')  # noise: no early end to its data
  (tmp_path / 'cut.png').write_bytes((tmp_path / 'whole.png').read_bytes()[:300])
  path = tmp_path / 'rows.jsonl'
  path.write_text(''.join(json.dumps(dict(image=i, caption='c')) + '\n'
                          for i in ('a.png', 'cut.png')))
  source = mmdata.build_source(_files_config(path), 'train')
  assert len(source) == 1 and source.skipped == {'image does not decode': 1}
  with pytest.raises(DataError, match=rf'{path}:2: image does not decode: .*cut.png'):
    mmdata.build_source(_files_config(path, on_bad='error'), 'train')


def test_to_rgb_on_arrays_as_tfds_gives_them():
  grey = np.full((2, 3, 1), 7, np.uint8)
  np.testing.assert_array_equal(image_ops.to_rgb(grey), np.full((2, 3, 3), 7))
  deep = np.full((2, 3, 3), 65535, np.uint16)
  np.testing.assert_array_equal(image_ops.to_rgb(deep), np.full((2, 3, 3), 255))
  rgba = np.zeros((2, 3, 4), np.uint8)  # transparent black
  np.testing.assert_array_equal(image_ops.to_rgb(rgba), np.full((2, 3, 3), 255))
  floats = np.array([[0.0, 1.0, np.nan]], np.float32)
  assert image_ops.to_rgb(floats)[0, :, 0].tolist() == [0, 255, 0]
  with pytest.raises(ValueError, match=r'shape \(2, 3, 5\)'):
    image_ops.to_rgb(np.zeros((2, 3, 5), np.uint8))


# ---------------------------------------------------------------- misnamed columns


@pytest.mark.parametrize('header, overrides, key, field', [
    ('image,text', {}, 'caption', 'text_key'),
    ('image,caption', dict(image_key='file'), 'file', 'image_key'),
    ('image,caption', dict(label_key='label'), 'label', 'label_key'),
])
def test_csv_header_without_a_configured_column_is_one_error(tmp_path, caplog, header,
                                                             overrides, key, field):
  _grey_png(tmp_path)
  path = tmp_path / 'rows.csv'
  path.write_text(f'{header}\n' + 'a.png,a cat\n' * 5)
  with caplog.at_level(logging.WARNING), pytest.raises(DataError) as e:
    mmdata.build_source(_files_config(path, **overrides), 'train')
  assert str(e.value) == (f'{path}:1: the header has no {key!r} column (data.{field}); '
                          f'its columns: {header.split(",")}')
  assert 'skipped' not in caplog.text


def test_jsonl_without_a_configured_key_in_any_row_is_one_error(tmp_path, caplog):
  _grey_png(tmp_path)
  path = tmp_path / 'rows.jsonl'
  path.write_text(''.join(json.dumps(dict(image='a.png', text='a cat', id=i)) + '\n'
                          for i in range(5)))
  with caplog.at_level(logging.WARNING), pytest.raises(DataError) as e:
    mmdata.build_source(_files_config(path), 'train')
  assert str(e.value) == (f"{path}: no row has a 'caption' field (data.text_key); "
                          "the rows have: ['image', 'text', 'id']")
  assert 'skipped' not in caplog.text


# ---------------------------------------------------------------- one source per split


def test_sources_builds_a_split_once_per_run(tmp_path, monkeypatch, caplog):
  for i in range(8):
    _grey_png(tmp_path, f'{i}.png', 20 * i)
  rows = [dict(image=f'{i}.png', caption=f'picture number {i}') for i in range(8)]
  rows.append(dict(image='gone.png', caption='missing'))
  path = tmp_path / 'rows.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  cfg = _files_config(path, image_size=8, max_len=8, vocab_size=60,
                      cache_dir=str(tmp_path / 'cache'))
  builds = []
  real_build = files.build
  monkeypatch.setattr(files, 'build', lambda data, split: builds.append(split) or real_build(
      data, split))

  sources = mmdata.Sources()
  with caplog.at_level(logging.WARNING):
    tok = mmdata.get_tokenizer(cfg, sources)  # trains on the train split: builds it
    it = mmdata.make_iterator(cfg, 'train', batch_size=4, train=True, tokenizer=tok,
                              source=sources.get(cfg, 'train'), process_index=0,
                              process_count=1)
    assert next(it)['image'].shape == (4, 8, 8, 3)
    assert sources.get(cfg, 'train') is sources.get(cfg, 'train')
  assert builds == ['train']
  assert caplog.text.count('skipped: image not found') == 1
  sources.get(cfg, 'test')  # another split, or another config, is another build
  sources.get(ml_collections.ConfigDict(dict(cfg, on_bad='skip')), 'train')
  assert builds == ['train', 'test', 'train']


def test_get_tokenizer_without_sources_builds_its_own(tmp_path, monkeypatch):
  cfg = ml_collections.ConfigDict(dict(name='digits', image_size=8, seed=0, vocab_size=60,
                                       cache_dir=str(tmp_path)))
  built = []
  real = mmdata.sources.build_source
  monkeypatch.setattr('mmjax.data.sources.build_source',
                      lambda data, split: built.append(split) or real(data, split))
  tok = mmdata.get_tokenizer(cfg)
  assert built == ['train'] and tok.hf.token_to_id('handwritten') is not None


# ---------------------------------------------------------------- source registry


def test_unknown_source_name_lists_the_registered_ones():
  assert set(mmdata.SOURCES) == {'shapes', 'digits', 'files', 'folder', 'tfds', 'webdataset'}
  with pytest.raises(DataError, match=r"data.name='fils': expected one of shapes, digits, "
                                      r'files, folder, tfds, webdataset'):
    mmdata.build_source(ml_collections.ConfigDict(dict(name='fils')), 'train')
  with pytest.raises(DataError, match="data.name='fils'"):
    mmdata.get_tokenizer(ml_collections.ConfigDict(dict(name='fils', cache_dir='')))


def test_building_one_source_imports_only_its_module(tmp_path):
  """A spawned grain worker loads only the module of the source it reads."""
  _grey_png(tmp_path)
  (tmp_path / 'rows.jsonl').write_text(json.dumps(dict(image='a.png', caption='c')) + '\n')
  code = (
      'import sys, ml_collections\n'
      'from mmjax.data import sources\n'
      f"sources.build_source(ml_collections.ConfigDict(dict(name='files', "
      f"path={str(tmp_path / 'rows.jsonl')!r})), 'train')\n"
      "print(sorted(m for m in sys.modules if m.startswith('mmjax.data.') or "
      "m in ('sklearn', 'tensorflow_datasets')))\n")
  path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH', '')]))
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=path))
  assert result.returncode == 0, result.stderr
  loaded = result.stdout.split('\n')[-2]
  assert 'mmjax.data.files' in loaded
  for other in ('shapes', 'digits', 'tfds_source', 'webdataset_source', 'sklearn',
                'tensorflow_datasets'):
    assert other not in loaded, loaded


# ---------------------------------------------------------------- augment options


class _Tiny:
  label_names = {}

  def __len__(self):
    return 8

  def __getitem__(self, i):
    return dict(image=np.zeros((8, 8, 3), np.uint8), caption='a picture')


@pytest.mark.parametrize('augment, message', [
    (dict(flipp=True), "data.augment.flipp: unknown key; did you mean 'flip'?"),
    (dict(crop_scale=(0.5, 1.0), color_jiter=(0.1, 0.1, 0.1)),
     "data.augment.color_jiter: unknown key; did you mean 'color_jitter'?"),
    (dict(randaugment=dict(magnitud=5)),
     "data.augment.randaugment.magnitud: unknown key; did you mean 'magnitude'?"),
])
def test_misspelt_augment_key_is_an_error(augment, message):
  tok = tokenizer_lib.train_wordpiece(['a picture'] * 4, 30)
  cfg = ml_collections.ConfigDict(dict(name='files', image_size=8, max_len=6, augment=augment))
  with pytest.raises(DataError, match=message.replace('?', r'\?')):
    mmdata.make_iterator(cfg, 'train', batch_size=4, train=True, tokenizer=tok, source=_Tiny(),
                         process_index=0, process_count=1)
