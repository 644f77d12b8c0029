"""make_iterator: batch layout, eval padding, resume, workers, host sharding, augmentation."""

import json

import ml_collections
import numpy as np
from PIL import Image
import pytest

from mmjax import data as mmdata
from mmjax.data import image_ops, tokenizer as tokenizer_lib


class _Numbered:
  """Each example names itself, so a test can tell which examples a batch holds."""

  label_names = {'label': ['even', 'odd']}

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = np.zeros((10, 10, 3), np.uint8)
    image[:, :5] = 255  # left half white: a flip is visible
    return dict(image=image, caption=f'example {i}', label=i % 2, uid=str(i))


def _config(tmp_path, **overrides):
  cfg = dict(name='shapes', image_size=16, max_len=12, seed=5, num_workers=0,
             mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
             augment=dict(crop_scale=(1.0, 1.0), flip=False), tokenizer='', vocab_size=200,
             cache_dir=str(tmp_path / 'cache'), train_size=40, eval_size=10, num_objects=(1, 3))
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.train_wordpiece([f'example {i}' for i in range(100)], 60)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_shapes_train_batch_layout(tmp_path):
  cfg = _config(tmp_path)
  tok = mmdata.get_tokenizer(cfg)
  batch = next(mmdata.make_iterator(cfg, 'train', batch_size=8, train=True, tokenizer=tok,
                                    process_index=0, process_count=1))
  assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].dtype == np.float32
  assert batch['text'].shape == batch['text_mask'].shape == (8, 12)
  assert batch['text'].dtype == batch['text_mask'].dtype == np.int32
  for key in ('color', 'shape', 'size', 'num_objects', 'answer_id'):
    assert batch[key].shape == (8,) and batch[key].dtype == np.int32, key
  assert batch['caption'].shape == (8,) and batch['caption'].dtype.kind == 'U'
  assert (batch['valid'] == 1).all()
  # Normalised with mean 0.5, std 0.25: the [0, 1] range maps to [-2, 2].
  assert -2.0 <= batch['image'].min() < -1.0 and 1.0 < batch['image'].max() <= 2.0
  assert tok.decode(batch['text'][0]) == batch['caption'][0].replace(',', ' ,')


def test_eval_is_one_ordered_pass_padded_to_whole_batches(tmp_path, tok):
  batches = list(mmdata.make_iterator(_config(tmp_path), 'test', batch_size=4, train=False,
                                      tokenizer=tok, source=_Numbered(10),
                                      process_index=0, process_count=1))
  assert len(batches) == 3
  assert [b['valid'].tolist() for b in batches] == [[1] * 4, [1] * 4, [1, 1, 0, 0]]
  real = [u for b in batches for u, v in zip(b['uid'], b['valid']) if v]
  assert real == [str(i) for i in range(10)]
  assert batches[-1]['image'].shape == (4, 16, 16, 3)


def test_training_reshuffles_each_epoch_and_drops_the_remainder(tmp_path, tok):
  it = mmdata.make_iterator(_config(tmp_path), 'train', batch_size=4, train=True, tokenizer=tok,
                            source=_Numbered(12), process_index=0, process_count=1)
  epochs = [[u for b in _take(it, 3) for u in b['uid']] for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(str(i) for i in range(12))
  assert epochs[0] != epochs[1]
  assert epochs[0] != [str(i) for i in range(12)]


def test_state_restore_resumes_exactly(tmp_path, tok):
  cfg = _config(tmp_path, augment=dict(crop_scale=(0.5, 1.0), flip=True))
  make = lambda: mmdata.make_iterator(cfg, 'train', batch_size=4, train=True, tokenizer=tok,
                                      source=_Numbered(10), process_index=0, process_count=1)
  it = make()
  _take(it, 3)  # past the first epoch boundary (10 // 4 = 2 batches per epoch)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  resumed = make()
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 4), expected)


def test_worker_processes_give_the_same_batches(tmp_path, tok):
  cfg = _config(tmp_path, augment=dict(crop_scale=(0.5, 1.0), flip=True))
  batches = {}
  for workers in (0, 2):
    cfg.num_workers = workers
    it = mmdata.make_iterator(cfg, 'train', batch_size=4, train=True, tokenizer=tok,
                              source=_Numbered(10), process_index=0, process_count=1)
    batches[workers] = _take(it, 5)
    json.dumps(it.get_state())  # the state goes into a checkpoint
  _assert_same_batches(batches[0], batches[2])


@pytest.mark.parametrize('train', [True, False])
def test_two_processes_split_the_global_batch(tmp_path, tok, train):
  cfg = _config(tmp_path)
  make = lambda index, count, batch: mmdata.make_iterator(
      cfg, 'train', batch_size=batch, train=train, tokenizer=tok, source=_Numbered(11),
      process_index=index, process_count=count)
  if train:
    whole = next(make(0, 1, 8))['uid']
    halves = [next(make(i, 2, 4))['uid'] for i in range(2)]
    assert not set(halves[0]) & set(halves[1])
    assert sorted(np.concatenate(halves)) == sorted(whole)
  else:
    shards = [list(make(i, 2, 4)) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2  # hosts take the same number of steps
    real = [u for s in shards for b in s for u, v in zip(b['uid'], b['valid']) if v]
    assert sorted(real, key=int) == [str(i) for i in range(11)]


def test_augmentation_only_in_training(tmp_path, tok):
  cfg = _config(tmp_path, augment=dict(crop_scale=(1.0, 1.0), flip=True))
  make = lambda train: mmdata.make_iterator(cfg, 'train', batch_size=8, train=train,
                                            tokenizer=tok, source=_Numbered(8),
                                            process_index=0, process_count=1)
  left_white = lambda b: b['image'][:, :, 0, 0] > 0  # [B, S] first column
  assert left_white(next(make(False))).all()
  flipped = ~left_white(next(make(True))).all(axis=1)
  assert 0 < flipped.sum() < 8


def test_crop_box_respects_scale_and_aspect_ratio():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = image_ops.crop_box(40, 60, (0.3, 0.6), rng)
    w, h = right - left, bottom - top
    assert 0 <= left < right <= 60 and 0 <= top < bottom <= 40
    assert 0.25 <= w * h / 2400 <= 0.65 and 0.7 <= w / h <= 1.4


def test_resize_is_bilinear_and_keeps_uint8():
  image = np.asarray(Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert('RGB'))
  out = image_ops.resize(image, 4)
  assert out.shape == (4, 4, 3) and out.dtype == np.uint8
  assert out[0, 0, 0] < out[0, -1, 0] < out[-1, -1, 0]
