"""A user's own labelled data: a folder per class (ImageFolder), or a JSONL / CSV file whose
labels are names or integers, with images or text only."""

import csv
import json
import logging

import ml_collections
import numpy as np
from PIL import Image
import pytest

from mmjax import data as mmdata
from mmjax.data import files, tokenizer as tokenizer_lib
from mmjax.data.errors import DataError

CLASSES = {'cat': 5, 'dog_house': 4, 'big-bird': 3}  # class folder -> number of images


def _png(path, value=120, suffix='.png'):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(path.with_suffix(suffix))


def _tree(root, classes=None):
  """root/<class>/<i>.png, each image a different grey; [(relative path, class)] in the
  order the folder source lists them (by class, then path)."""
  listing = []
  for c, (name, count) in enumerate(sorted((classes or CLASSES).items())):
    for i in range(count):
      _png(root / name / f'{i}.png', (10 * c + 20 * i) % 256)
      listing.append((f'{name}/{i}.png', name))
  return listing


def _config(name, path, **fields):
  defaults = dict(name=name, path=str(path), image_size=8, max_len=6, seed=0, label_key='label')
  return ml_collections.ConfigDict({**defaults, **fields})


def _batches(cfg, split, tok):
  it = mmdata.make_iterator(cfg, split, batch_size=4, train=False, tokenizer=tok,
                            process_index=0, process_count=1)
  n = len(mmdata.build_source(cfg, split))
  return [next(it) for _ in range(-(-n // 4))]


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.train_wordpiece(['cat', 'dog house', 'big bird', 'a b c'] * 10, 60)


# ---------------------------------------------------------------- one dataset, three layouts


def test_folder_jsonl_and_csv_of_the_same_images_give_the_same_batches(tmp_path, tok):
  listing = _tree(tmp_path)
  rows = [dict(image=p, caption=c.replace('_', ' ').replace('-', ' '), label=c)
          for p, c in listing]
  (tmp_path / 'rows.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  with open(tmp_path / 'rows.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=['image', 'caption', 'label'])
    writer.writeheader()
    writer.writerows(rows)
  configs = [_config('folder', tmp_path, test_fraction=0.25),
             _config('files', tmp_path / 'rows.jsonl', test_fraction=0.25),
             _config('files', tmp_path / 'rows.csv', test_fraction=0.25)]
  for split in ('train', 'test'):
    sources = [mmdata.build_source(cfg, split) for cfg in configs]
    for source in sources:
      assert source.label_names == {'label': ['big-bird', 'cat', 'dog_house']}
      np.testing.assert_array_equal(source.labels, sources[0].labels)
    expected, *others = [_batches(cfg, split, tok) for cfg in configs]
    assert expected[0]['image'].shape == (4, 8, 8, 3)
    for batches in others:
      assert len(batches) == len(expected)
      for got, want in zip(batches, expected):
        assert sorted(got) == sorted(want)
        for key in want:
          np.testing.assert_array_equal(got[key], want[key], err_msg=f'{split} {key}')
  assert set(expected[0]['label']) <= {0, 1, 2}


def test_train_and_test_folders_are_the_splits_and_test_beats_val(tmp_path):
  _tree(tmp_path / 'train', {'a': 2, 'b': 2, 'c': 2})
  _tree(tmp_path / 'test', {'b': 1, 'c': 2})
  _tree(tmp_path / 'val', {'a': 3})
  cfg = _config('folder', tmp_path)
  train, test = (mmdata.build_source(cfg, split) for split in ('train', 'test'))
  assert train.label_names == test.label_names == {'label': ['a', 'b', 'c']}
  assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
  assert test.labels.tolist() == [1, 2, 2]  # test/ lacks 'a'; ids are still train's
  example = test[0]
  assert example['caption'] == 'b' and example['label'] == 1
  assert example['image_path'] == str(tmp_path / 'test' / 'b' / '0.png')
  assert example['image'].shape == (6, 8, 3) and example['image'].dtype == np.uint8
  assert train.texts() == ['a', 'a', 'b', 'b', 'c', 'c']


def test_stratified_split_keeps_every_class_in_both_and_is_seeded(tmp_path):
  _tree(tmp_path, {'many': 10, 'some': 5, 'two': 2, 'one': 1})
  cfg = _config('folder', tmp_path, test_fraction=0.2)
  train, test = (mmdata.build_source(cfg, split) for split in ('train', 'test'))
  assert np.bincount(train.labels).tolist() == [8, 1, 4, 1]  # many, one, some, two
  assert np.bincount(test.labels, minlength=4).tolist() == [2, 0, 1, 1]
  paths = [{s[i]['image_path'] for i in range(len(s))} for s in (train, test)]
  assert not paths[0] & paths[1] and len(paths[0] | paths[1]) == 18
  again = mmdata.build_source(cfg, 'test')
  assert [again[i]['image_path'] for i in range(len(again))] == [
      test[i]['image_path'] for i in range(len(test))]
  other = mmdata.build_source(ml_collections.ConfigDict(dict(cfg, seed=1)), 'test')
  assert {other[i]['image_path'] for i in range(len(other))} != paths[1]


def test_image_extensions_match_in_any_case_and_other_files_are_one_warning(tmp_path, caplog):
  for name, suffix in (('A', '.JPG'), ('b', '.Png'), ('c', '.TIFF'), ('d', '.jpeg')):
    _png(tmp_path / 'x' / name, suffix=suffix)
  _png(tmp_path / 'y' / 'deeper' / 'e')  # any depth of a class folder
  for name in ('notes.txt', 'labels.json', '.DS_Store'):
    (tmp_path / 'y' / name).write_text('not an image')
  with caplog.at_level(logging.WARNING):
    source = mmdata.build_source(_config('folder', tmp_path, test_fraction=0.0), 'train')
  assert sorted(source[i]['image_path'].rsplit('/', 1)[1] for i in range(len(source))) == [
      'A.JPG', 'b.Png', 'c.TIFF', 'd.jpeg', 'e.png']
  assert source.skipped == {'not an image file': 3}
  assert caplog.text.count('not images by their extension') == 1
  assert 'skipped 3 files' in caplog.text


# ---------------------------------------------------------------- bad folders


def test_a_missing_root_or_a_file_is_an_error_naming_it(tmp_path):
  with pytest.raises(DataError, match=f'no such folder {tmp_path / "nowhere"}'):
    mmdata.build_source(_config('folder', tmp_path / 'nowhere'), 'train')
  (tmp_path / 'a.png').write_bytes(b'')
  with pytest.raises(DataError, match=f'{tmp_path / "a.png"} is not a folder'):
    mmdata.build_source(_config('folder', tmp_path / 'a.png'), 'train')


def test_one_class_is_an_error(tmp_path):
  _tree(tmp_path, {'only': 3})
  with pytest.raises(DataError) as e:
    mmdata.build_source(_config('folder', tmp_path), 'train')
  assert str(e.value) == (f"a classifier needs at least 2 classes; {tmp_path} has one class "
                          "folder 'only'")


def test_empty_class_folders_are_skipped_by_name(tmp_path, caplog):
  _tree(tmp_path, {'a': 2, 'b': 2})
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'texts').mkdir()
  (tmp_path / 'texts' / 'readme.md').write_text('no images here')
  with caplog.at_level(logging.WARNING):
    source = mmdata.build_source(_config('folder', tmp_path, test_fraction=0.0), 'train')
  assert source.label_names == {'label': ['a', 'b']}
  assert source.skipped == {'empty class folder': 2, 'not an image file': 1}
  assert "skipped class folder 'empty': it is empty" in caplog.text
  assert "skipped class folder 'texts': no image files among its 1" in caplog.text


def test_too_few_classes_after_skipping_empty_ones_is_an_error(tmp_path):
  _tree(tmp_path, {'a': 2})
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match=rf"{tmp_path} has one class folder 'a' \(1 more "
                                      'without images\\)'):
    mmdata.build_source(_config('folder', tmp_path), 'train')


def test_an_image_that_does_not_decode_is_a_counted_skip_or_an_error(tmp_path, caplog):
  _tree(tmp_path, {'a': 2, 'b': 2})
  (tmp_path / 'b' / 'broken.png').write_bytes(b'\x89PNG but not really')
  cfg = _config('folder', tmp_path, test_fraction=0.0)
  with caplog.at_level(logging.WARNING):
    source = mmdata.build_source(cfg, 'train')
  assert len(source) == 4 and source.skipped == {'image does not decode': 1}
  assert f'{tmp_path / "b" / "broken.png"}: skipped: image does not decode' in caplog.text
  cfg.on_bad = 'error'
  with pytest.raises(DataError, match=f'{tmp_path / "b" / "broken.png"}: image does not decode'):
    mmdata.build_source(cfg, 'train')


def test_a_test_class_that_train_lacks_is_an_error_naming_both(tmp_path):
  _tree(tmp_path / 'train', {'cats': 2, 'dogs': 2})
  _tree(tmp_path / 'val', {'cat': 1, 'dogs': 1})
  with pytest.raises(DataError) as e:
    mmdata.build_source(_config('folder', tmp_path), 'test')
  assert str(e.value).startswith(f"{tmp_path / 'val'}: class folder 'cat' has no images in "
                                 f"{tmp_path / 'train'}")
  assert "did you mean 'cats'?" in str(e.value)


def test_no_test_split_without_a_test_fraction_or_folder_is_an_error(tmp_path):
  _tree(tmp_path, {'a': 2, 'b': 2})
  cfg = _config('folder', tmp_path, test_fraction=0.0)
  assert len(mmdata.build_source(cfg, 'train')) == 4  # every image is train
  with pytest.raises(DataError, match='no test split: data.test_fraction=0'):
    mmdata.build_source(cfg, 'test')
  with pytest.raises(DataError, match=r'data.test_fraction=1.0: expected a number in \[0, 1\)'):
    mmdata.build_source(_config('folder', tmp_path, test_fraction=1.0), 'train')


def test_more_than_10000_class_folders_is_an_error(tmp_path):
  for i in range(files.MAX_CLASSES + 1):
    (tmp_path / f'c{i}').mkdir()
  with pytest.raises(DataError, match=f'{tmp_path}: 10,001 class folders, more than the '
                                      '10,000 supported'):
    mmdata.build_source(_config('folder', tmp_path), 'train')


# ---------------------------------------------------------------- labels in files


def _write(path, rows, fields=None):
  if path.suffix == '.jsonl':
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return path
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields or list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path


def test_csv_rows_without_a_label_are_counted_skips(tmp_path, caplog):
  rows = [dict(text=f'review {i}', label='' if i in (2, 4) else ('good', 'bad')[i % 2])
          for i in range(6)]
  path = _write(tmp_path / 'rows.csv', rows)
  with caplog.at_level(logging.WARNING):
    source = mmdata.build_source(_config('files', path, image_key='', text_key='text'),
                                 'train')
  assert source.skipped == {'missing label': 2}
  assert [line for _, line, _ in source.skipped_rows] == [4, 6]
  assert f"{path}:4: skipped: missing label: field 'label' is empty or missing" in caplog.text
  assert source.label_names == {'label': ['bad', 'good']}
  assert source.labels.tolist() == [1, 0, 0, 0]


def test_integer_labels_stay_integers_and_one_name_makes_them_all_names(tmp_path, caplog):
  path = _write(tmp_path / 'rows.csv', [dict(text='t', label=v) for v in ('3', '0', '10')])
  source = mmdata.build_source(_config('files', path, image_key='', text_key='text'), 'train')
  assert source.labels.tolist() == [3, 0, 10]
  assert source.label_names['label'] == [str(i) for i in range(11)]
  path = _write(tmp_path / 'rows.jsonl', [dict(text='t', label=v) for v in (3, 10, 'cat', 2)])
  with caplog.at_level(logging.WARNING):
    source = mmdata.build_source(_config('files', path, image_key='', text_key='text'),
                                 'train')
  assert source.label_names['label'] == ['10', '2', '3', 'cat']
  assert source.labels.tolist() == [2, 0, 3, 1]
  assert f"{path}:3: label 'cat' is not an integer" in caplog.text


def test_test_split_reads_the_train_labels_without_decoding_train_images(tmp_path,
                                                                        monkeypatch):
  _png(tmp_path / 'x.png')
  _write(tmp_path / 'train.jsonl', [dict(image='gone.png', caption='c', label=n)
                                    for n in ('zebra', 'ant', 'moth')])
  _write(tmp_path / 'test.jsonl', [dict(image='x.png', caption='c', label=n)
                                   for n in ('moth', 'ant')])
  decoded = []
  real = files.decode_image
  monkeypatch.setattr(files, 'decode_image', lambda p: decoded.append(p) or real(p))
  source = mmdata.build_source(_config('files', tmp_path / '{split}.jsonl'), 'test')
  assert source.label_names == {'label': ['ant', 'moth', 'zebra']}
  assert source.labels.tolist() == [1, 0]
  assert decoded == [tmp_path / 'x.png'] * 2


def test_a_test_label_that_train_lacks_is_an_error_naming_the_row(tmp_path):
  _write(tmp_path / 'train.csv', [dict(text='t', label=n) for n in ('cat', 'dog')])
  _write(tmp_path / 'test.csv', [dict(text='t', label=n) for n in ('dog', 'cow')])
  cfg = _config('files', tmp_path / '{split}.csv', image_key='', text_key='text')
  with pytest.raises(DataError) as e:
    mmdata.build_source(cfg, 'test')
  assert str(e.value) == (f"{tmp_path / 'test.csv'}:3: label 'cow' is not among the 2 "
                          "labels of the train split's file")


def test_more_than_10000_distinct_labels_is_an_error_naming_file_and_column(tmp_path):
  path = _write(tmp_path / 'rows.csv', [dict(text='t', id=f'n{i}')
                                        for i in range(files.MAX_CLASSES + 1)])
  with pytest.raises(DataError, match=f"{path}: column 'id': 10,001 classes, more than the "
                                      '10,000 supported'):
    mmdata.build_source(_config('files', path, image_key='', text_key='text', label_key='id'),
                        'train')


def test_one_file_split_by_test_fraction_is_stratified_and_seeded(tmp_path):
  rows = [dict(text=f'{label} {i}', label=label)
          for label, count in (('a', 10), ('b', 5), ('c', 1)) for i in range(count)]
  path = _write(tmp_path / 'rows.jsonl', rows)
  cfg = _config('files', path, image_key='', text_key='text', test_fraction=0.2)
  train, test = (mmdata.build_source(cfg, split) for split in ('train', 'test'))
  assert np.bincount(train.labels).tolist() == [8, 4, 1]
  assert np.bincount(test.labels, minlength=3).tolist() == [2, 1, 0]
  assert not set(train.texts()) & set(test.texts())
  assert mmdata.build_source(cfg, 'test').texts() == test.texts()
  other = mmdata.build_source(ml_collections.ConfigDict(dict(cfg, seed=3)), 'test')
  assert other.texts() != test.texts()
  with pytest.raises(DataError, match='splits one file'):
    mmdata.build_source(_config('files', tmp_path / '{split}.jsonl', test_fraction=0.2),
                        'train')


def test_text_only_rows_give_batches_without_images(tmp_path, tok):
  rows = [dict(text=f'{"a b" if i % 2 else "c"} review', label=('pos', 'neg')[i % 2])
          for i in range(6)]
  path = _write(tmp_path / 'rows.jsonl', rows)
  cfg = _config('files', path, image_key='', text_key='text', text_field='caption')
  batches = _batches(cfg, 'train', tok)
  batch = batches[0]
  assert 'image' not in batch and 'image_path' not in batch
  assert batch['text'].shape == batch['text_mask'].shape == (4, 6)
  assert batch['label'].tolist() == [1, 0, 1, 0]  # ['neg', 'pos']
  assert batches[1]['valid'].tolist() == [1, 1, 0, 0]
  it = mmdata.make_iterator(cfg, 'train', batch_size=2, train=True, tokenizer=tok,
                            process_index=0, process_count=1)
  assert 'image' not in next(it)
