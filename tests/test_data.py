"""Sources and tokenizer: shapes, digits, files, tfds; WordPiece training, loading, caching."""

import csv
import json
import logging
import re

import ml_collections
import numpy as np
from PIL import Image
import pytest

from mmjax import data as mmdata
from mmjax.data import digits, shapes, tokenizer as tokenizer_lib
from mmjax.data.errors import DataError


def _shapes_config(tmp_path, **overrides):
  cfg = dict(name='shapes', image_size=16, max_len=24, seed=3, tokenizer='', vocab_size=200,
             cache_dir=str(tmp_path / 'cache'), train_size=48, eval_size=24, num_objects=(1, 3))
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


# ---------------------------------------------------------------- shapes


def test_shapes_is_deterministic_and_cache_matches_fresh_rendering(tmp_path):
  a = mmdata.build_source(_shapes_config(tmp_path / 'a'), 'train')
  b = mmdata.build_source(_shapes_config(tmp_path / 'b'), 'train')
  for i in (0, 7, 47):
    fresh = shapes.make_example(3, 'train', i, 16, (1, 3))
    for ex in (a[i], b[i]):
      np.testing.assert_array_equal(ex['image'], fresh['image'])
      assert ex['caption'] == fresh['caption'] and ex['color'] == fresh['color']


def test_shapes_second_build_reads_the_cache(tmp_path, monkeypatch):
  cfg = _shapes_config(tmp_path)
  mmdata.build_source(cfg, 'test')
  monkeypatch.setattr(shapes, '_render_split', lambda *a: pytest.fail('rendered twice'))
  assert len(mmdata.build_source(cfg, 'test')) == 24
  cfg.image_size = 20  # another resolution is another cache entry
  with pytest.raises(pytest.fail.Exception):
    mmdata.build_source(cfg, 'test')


def test_shapes_splits_never_share_an_image(tmp_path):
  cfg = _shapes_config(tmp_path)
  sources = {split: mmdata.build_source(cfg, split) for split in ('train', 'val', 'test')}
  images = {split: np.stack([s[i]['image'] for i in range(len(s))]) for split, s in sources.items()}
  assert len(images['train']) == 48 and len(images['test']) == 24
  for x, y in (('train', 'test'), ('train', 'val'), ('val', 'test')):
    same = (images[x][:, None] == images[y][None]).all(axis=(2, 3, 4))
    assert not same.any(), f'{x} and {y} share an image'


def test_shapes_captions_agree_with_labels_and_answers(tmp_path):
  source = mmdata.build_source(_shapes_config(tmp_path, train_size=200), 'train')
  names = source.label_names
  counts = set()
  for ex in (source[i] for i in range(len(source))):
    first = f"{names['size'][ex['size']]} {names['color'][ex['color']]} {names['shape'][ex['shape']]}"
    assert ex['caption'].startswith(f'a {first}'), (ex['caption'], first)
    mentioned = len(re.findall(r'\b(?:' + '|'.join(shapes.SHAPES) + r')\b', ex['caption']))
    assert mentioned == ex['num_objects']
    assert names['answer_id'][ex['answer_id']] == ex['answer']
    if ex['question'] == 'how many shapes are there?':
      assert ex['answer'] == shapes.NUMBERS[ex['num_objects']]
    counts.add(ex['num_objects'])
  assert counts == {1, 2, 3}


def test_shapes_relation_uses_the_dominant_axis():
  at = lambda x, y: dict(x=x, y=y)
  assert shapes.relation(at(0.2, 0.5), at(0.8, 0.4)) == 'left of'
  assert shapes.relation(at(0.8, 0.5), at(0.2, 0.6)) == 'right of'
  assert shapes.relation(at(0.5, 0.1), at(0.4, 0.9)) == 'above'
  assert shapes.relation(at(0.5, 0.9), at(0.6, 0.1)) == 'below'


@pytest.mark.parametrize('size', [16, 48])
def test_shapes_renders_the_object_at_any_resolution(size):
  red_circle = dict(shape='circle', color='red', size='large', x=0.5, y=0.5, r=0.17)
  image = shapes.render([red_circle], size, np.random.default_rng(0))
  assert image.shape == (size, size, 3) and image.dtype == np.uint8
  r, g, b = image[size // 2, size // 2].astype(int)
  assert r > 150 and g < 110 and b < 110, (r, g, b)
  assert image[0, 0].max() < 90  # dark background


def test_shapes_rejects_bad_config(tmp_path):
  with pytest.raises(DataError, match='num_objects'):
    mmdata.build_source(_shapes_config(tmp_path, num_objects=(1, 5)), 'train')
  with pytest.raises(DataError, match='split'):
    mmdata.build_source(_shapes_config(tmp_path), 'validation')


# ---------------------------------------------------------------- digits


def test_digits_split_is_stratified_and_disjoint():
  cfg = ml_collections.ConfigDict(dict(name='digits', image_size=24, seed=0))
  train, test = mmdata.build_source(cfg, 'train'), mmdata.build_source(cfg, 'test')
  assert len(train) + len(test) == 1797 and len(test) == 360
  assert not set(train.indices) & set(test.indices)
  assert set(train.labels) == set(test.labels) == set(range(10))
  ex = test[5]
  assert ex['image'].shape == (24, 24, 3) and ex['image'].dtype == np.uint8
  assert ex['image'].max() > 200  # ink scaled from 0..16 to 0..255
  assert digits.DIGIT_NAMES[ex['label']] in ex['caption']
  other = mmdata.build_source(ml_collections.ConfigDict(dict(cfg, seed=1)), 'test')
  assert set(other.indices) != set(test.indices)


# ---------------------------------------------------------------- files


def _write_rows(tmp_path, fmt):
  Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(tmp_path / 'good.png')
  (tmp_path / 'corrupt.jpg').write_bytes(b'not really a jpeg')
  rows = [dict(image='good.png', caption='a grey square', label=2),
          dict(image='gone.png', caption='missing file', label=0),
          dict(image='corrupt.jpg', caption='broken bytes', label=0),
          dict(image='good.png', caption='', label=1),
          dict(caption='no image field', label=1)]
  path = tmp_path / f'rows.{fmt}'
  if fmt == 'jsonl':
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  else:
    with open(path, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=['image', 'caption', 'label'])
      writer.writeheader()
      writer.writerows(rows)
  return path


@pytest.mark.parametrize('fmt, first_line', [('jsonl', 1), ('csv', 2)])
def test_files_skips_and_counts_bad_rows(tmp_path, caplog, fmt, first_line):
  path = _write_rows(tmp_path, fmt)
  cfg = ml_collections.ConfigDict(dict(name='files', path=str(path), label_key='label'))
  with caplog.at_level(logging.WARNING):
    source = mmdata.build_source(cfg, 'train')
  assert len(source) == 1
  assert source[0]['caption'] == 'a grey square' and source[0]['label'] == 2
  assert source[0]['image'].shape == (10, 12, 3)
  assert source.skipped == {'image not found': 1, 'image does not decode': 1,
                            'empty caption': 1, 'missing image': 1}
  assert [line for _, line, _ in source.skipped_rows] == [first_line + i for i in range(1, 5)]
  assert f'{path}:{first_line + 1}: skipped: image not found' in caplog.text
  assert 'skipped 4 of 5 rows' in caplog.text


def test_files_on_bad_error_names_file_and_line(tmp_path):
  path = _write_rows(tmp_path, 'jsonl')
  cfg = ml_collections.ConfigDict(dict(name='files', path=str(path), on_bad='error'))
  with pytest.raises(DataError, match=rf'{path}:2: image not found'):
    mmdata.build_source(cfg, 'train')


def test_files_split_placeholder_and_no_valid_rows(tmp_path):
  (tmp_path / 'test.jsonl').write_text(json.dumps(dict(image='x.png', caption='c')) + '\n')
  cfg = ml_collections.ConfigDict(dict(name='files', path=str(tmp_path / '{split}.jsonl')))
  with pytest.raises(DataError, match='no valid rows'):
    mmdata.build_source(cfg, 'test')
  with pytest.raises(DataError, match='no such file'):
    mmdata.build_source(cfg, 'train')


# ---------------------------------------------------------------- tfds


def _tiny_tfds(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # skip_registration: the builder is defined anew by every call (tests in one process).
  class TinyPairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(12, 12, 3)),
          'caption': tfds.features.Text(),
          'label': tfds.features.ClassLabel(names=['cat', 'tree_frog'])}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(10), 'test': self._generate_examples(5)}

    def _generate_examples(self, n):
      for i in range(n):
        # Encoded images (here PIL) need no TensorFlow; raw numpy arrays would.
        image = Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8))
        yield i, dict(image=image, caption=f'thing number {i}', label=i % 2)

  TinyPairs(data_dir=str(data_dir), file_format='array_record').download_and_prepare()


def test_tfds_source_reads_array_record_without_tensorflow(tmp_path):
  _tiny_tfds(tmp_path)
  cfg = ml_collections.ConfigDict(dict(name='tfds', tfds_name='tiny_pairs', data_dir=str(tmp_path),
                                       image_key='image', text_key='caption', label_key='label'))
  source = mmdata.build_source(cfg, 'train')
  assert len(source) == 10 and source.label_names == {'label': ['cat', 'tree_frog']}
  examples = [source[i] for i in range(10)]
  by_caption = {ex['caption']: ex for ex in examples}
  assert sorted(by_caption) == sorted(f'thing number {i}' for i in range(10))
  ex = by_caption['thing number 3']
  assert ex['label'] == 1 and ex['image'].shape == (12, 12, 3) and ex['image'][0, 0, 0] == 60

  cfg.update(image_size=8, max_len=10, tokenizer='', vocab_size=60, cache_dir=str(tmp_path / 'c'))
  tok = mmdata.get_tokenizer(cfg)
  batches = list(mmdata.make_iterator(cfg, 'test', batch_size=4, train=False, tokenizer=tok,
                                      process_index=0, process_count=1))
  assert [b['valid'].sum() for b in batches] == [4, 1]
  assert batches[0]['image'].shape == (4, 8, 8, 3) and batches[0]['label'].dtype == np.int32
  assert tok.decode(batches[0]['text'][0]) == batches[0]['caption'][0]

  cfg.text_key = ''
  templated = mmdata.build_source(cfg, 'test')
  assert {templated[i]['caption'] for i in range(5)} == {'a photo of a cat.', 'a photo of a tree frog.'}

  cfg.text_key = 'text'
  with pytest.raises(DataError, match=r"data.text_key='text'.*\['caption', 'image', 'label'\]"):
    mmdata.build_source(cfg, 'train')


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.train_wordpiece(
      ['a small red circle left of a large blue square', 'a handwritten digit seven'] * 20, 100)


def test_tokenizer_round_trip_and_padding(tok):
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  ids, mask = tok.encode(['a red circle', 'a small red circle left of a large blue square'], 8)
  assert ids.shape == mask.shape == (2, 8) and ids.dtype == mask.dtype == np.int32
  assert ids[0, 0] == tok.cls_id and ids[0, 4] == tok.sep_id and (ids[0, 5:] == tok.pad_id).all()
  assert mask[0].tolist() == [1] * 5 + [0] * 3
  assert ids[1, -1] == tok.sep_id and mask[1].all()  # truncated, [SEP] kept last
  assert tok.decode(ids[0]) == 'a red circle'
  long = tok.decode(ids)[1]
  assert 'a small red circle left of a large blue square'.startswith(long) and len(long) > 10


def test_tokenizer_save_and_load(tok, tmp_path):
  tok.save(tmp_path / 'tok')
  loaded = mmdata.load_tokenizer(tmp_path / 'tok')
  text = ['a large blue square seven']
  np.testing.assert_array_equal(loaded.encode(text, 12)[0], tok.encode(text, 12)[0])
  assert loaded.vocab_size == tok.vocab_size
  with pytest.raises(DataError, match=str(tmp_path / 'nowhere')):
    mmdata.load_tokenizer(tmp_path / 'nowhere')


def test_tokenizer_from_bare_vocab_txt(tmp_path):
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'red', 'circ', '##le']
  (tmp_path / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
  tok = mmdata.load_tokenizer(tmp_path)
  ids, _ = tok.encode('A Red Circle blue', 8)
  assert ids[0].tolist() == [2, 5, 6, 7, 8, 1, 3, 0]
  assert tok.mask_id == 4 and tok.vocab_size == 9


def test_tokenizer_finds_roberta_style_specials(tmp_path):
  from tokenizers import Tokenizer as HF, models  # pylint: disable=g-import-not-at-top
  hf = HF(models.WordLevel({'<pad>': 0, '<s>': 1, '</s>': 2, '<unk>': 3, '<mask>': 4, 'hi': 5},
                           unk_token='<unk>'))
  tok = mmdata.Tokenizer(hf)
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
  hf = HF(models.WordLevel({'hi': 0, '[UNK]': 1}, unk_token='[UNK]'))
  with pytest.raises(DataError, match='no cls token'):
    mmdata.Tokenizer(hf, 'bare')


def test_get_tokenizer_trains_once_and_reuses_the_cache(tmp_path, monkeypatch):
  cfg = _shapes_config(tmp_path)
  tok = mmdata.get_tokenizer(cfg)
  for word in shapes.COLORS + shapes.SHAPES + shapes.SIZES + ('left', 'above', 'how'):
    assert tok.hf.token_to_id(word) is not None, word
  monkeypatch.setattr('mmjax.data.sources.build_source', lambda *a: pytest.fail('retrained'))
  again = mmdata.get_tokenizer(cfg)
  assert again.hf.get_vocab() == tok.hf.get_vocab()
  cfg.vocab_size = 150  # another vocabulary size is another cache entry
  with pytest.raises(pytest.fail.Exception):
    mmdata.get_tokenizer(cfg)
