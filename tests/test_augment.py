"""Train-time augmentation: colour jitter and RandAugment per image, mixup / cutmix per batch."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import mmjax
from mmjax import objectives
from mmjax.config import load_config
from mmjax.data import image_ops, pipeline
from mmjax.data.errors import DataError
from mmjax.train import mixing
from mmjax.train.metrics_writer import read_metrics


def _image(seed=0, size=24):
  """A colourful uint8 [size, size, 3] with structure (so geometric ops change it)."""
  rng = np.random.default_rng(seed)
  image = rng.integers(30, 180, (size, size, 3), dtype=np.uint8)   # autocontrast has work to do
  image[size // 4: size // 2, size // 4:] = (200, 40, 90)
  return image


# ---- per-image ops (numpy, host) ----

@pytest.mark.parametrize('name', image_ops.RAND_OPS)
def test_each_rand_augment_op_keeps_dtype_and_shape(name):
  image = _image()
  out = image_ops.rand_augment_op(image, name, magnitude=9, sign=-1)
  assert out.dtype == np.uint8
  chex.assert_shape(out, image.shape)
  if name == 'identity':
    np.testing.assert_array_equal(out, image)
  else:
    assert not np.array_equal(out, image), f'{name} at magnitude 9 left the image unchanged'


@pytest.mark.parametrize('name', ['rotate', 'shear_x', 'shear_y', 'translate_x', 'translate_y',
                                  'solarize', 'posterize', 'color', 'contrast', 'brightness',
                                  'sharpness'])
def test_rand_augment_magnitude_zero_is_identity(name):
  image = _image()
  np.testing.assert_array_equal(image_ops.rand_augment_op(image, name, 0, sign=1), image)


def test_rand_augment_strength_grows_with_magnitude():
  image = _image()
  def change(magnitude):
    out = image_ops.rand_augment_op(image, 'rotate', magnitude)
    return np.abs(out.astype(int) - image).mean()

  assert change(3) < change(9) < change(30)


def test_rand_augment_deterministic_given_rng():
  image = _image()
  runs = [image_ops.rand_augment(image, np.random.default_rng(s), num_ops=3, magnitude=9)
          for s in (7, 7, 8)]
  np.testing.assert_array_equal(runs[0], runs[1])
  assert runs[0].dtype == np.uint8 and runs[0].shape == image.shape
  np.testing.assert_array_equal(image_ops.rand_augment(image, np.random.default_rng(0), 0), image)


def test_color_jitter_zero_is_identity_and_deterministic():
  image = _image()
  np.testing.assert_array_equal(
      image_ops.color_jitter(image, np.random.default_rng(0), 0, 0, 0, 0), image)
  runs = [image_ops.color_jitter(image, np.random.default_rng(3), 0.4, 0.4, 0.4, 0.1)
          for _ in range(2)]
  np.testing.assert_array_equal(runs[0], runs[1])
  assert runs[0].dtype == np.uint8 and runs[0].shape == image.shape
  assert not np.array_equal(runs[0], image)


def test_color_jitter_hue_alone_keeps_grey_grey():
  grey = np.full((8, 8, 3), 120, np.uint8)
  out = image_ops.color_jitter(grey, np.random.default_rng(0), 0, 0, 0, hue=0.5)
  np.testing.assert_array_equal(out, grey)


# ---- the data pipeline ----

class _Source:
  label_names = {'label': ['a', 'b']}

  def __len__(self):
    return 4

  def __getitem__(self, i):
    return dict(image=_image(i, 16), caption=f'example {i}', label=i % 2)


class _Tokenizer:
  def encode(self, texts, max_len):
    return np.zeros((len(texts), max_len), np.int32), np.ones((len(texts), max_len), np.int32)


def _dataset(train=True, **augment):
  data = ml_collections.ConfigDict(dict(image_size=16, max_len=8, seed=1,
                                        augment=dict(dict(crop_scale=(1.0, 1.0), flip=False),
                                                     **augment)))
  return pipeline.make_dataset(data, 'train', batch_size=2, train=train, tokenizer=_Tokenizer(),
                               process_index=0, process_count=1, source=_Source())


def _first_images(ds):
  return ds[0]['image']   # [2, 16, 16, 3]


def test_pipeline_augmentation_is_deterministic_and_train_only():
  on = dict(color_jitter=(0.3, 0.3, 0.3, 0.05), randaugment=dict(num_ops=2, magnitude=9))
  plain = _first_images(_dataset())
  first, again = _first_images(_dataset(**on)), _first_images(_dataset(**on))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, plain)
  np.testing.assert_array_equal(_first_images(_dataset(train=False, **on)),
                                _first_images(_dataset(train=False)))


@pytest.mark.parametrize('key, value', [
    ('crop_scale', (0.5,)),
    ('crop_scale', (0.9, 0.5)),
    ('flip', 1),
    ('color_jitter', (0.4, 0.4)),
    ('color_jitter', (0.4, -0.1, 0.4)),
    ('color_jitter', (0.4, 0.4, 0.4, 0.7)),
    ('randaugment', dict(magnitude=31)),
    ('randaugment', dict(num_ops=-1)),
    ('randaugment', dict(ops=2)),
])
def test_bad_augment_config_raises_at_build_time(key, value):
  with pytest.raises(DataError, match=f'data.augment.{key}'):
    _dataset(**{key: value})


# ---- mixup / cutmix (device) ----

def _batch(b=4, size=8, classes=5):
  """Row i's image is the constant i + 1, so a pixel says which row it came from."""
  image = jnp.broadcast_to(jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None],
                           (b, size, size, 3))
  return dict(image=image, label=jnp.arange(b) % classes)


def _mix_config(**mix):
  return ml_collections.ConfigDict(dict(mix=mix, objectives=dict(classify=1.0)))


def test_mixup_equals_the_formula():
  fn = jax.jit(mixing.batch_fn(_mix_config(mixup=0.4)))
  batch = _batch()
  for seed in range(3):
    out = fn(batch, jax.random.key(seed))
    chex.assert_shape(out['mix_lam'], (4,))
    chex.assert_type(out['mix_lam'], jnp.float32)
    lam = float(out['mix_lam'][0])
    assert 0 < lam < 1   # prob=1: every batch is mixed
    np.testing.assert_array_equal(out['mix_lam'], lam)
    expected = lam * batch['image'] + (1 - lam) * jnp.roll(batch['image'], 1, axis=0)
    np.testing.assert_allclose(out['image'], expected, rtol=1e-6)
    np.testing.assert_array_equal(out['label'], batch['label'])


def test_cutmix_pasted_area_is_one_minus_lam():
  fn = jax.jit(mixing.batch_fn(_mix_config(cutmix=1.0)))
  batch = _batch(size=16)
  partner = np.roll(np.asarray(batch['image']), 1, axis=0)
  lams = []
  for seed in range(6):
    out = fn(batch, jax.random.key(seed))
    lam = float(out['mix_lam'][0])
    pasted = (np.asarray(out['image']) == partner).all(-1).mean(axis=(1, 2))   # [B]
    np.testing.assert_allclose(pasted, 1 - lam, atol=1e-6)
    lams.append(lam)
  assert any(0 < lam < 1 for lam in lams)


def test_prob_leaves_some_batches_unmixed():
  fn = jax.jit(mixing.batch_fn(_mix_config(mixup=0.2, cutmix=1.0, prob=0.5)))
  batch = _batch()
  unmixed = 0
  for seed in range(8):
    out = fn(batch, jax.random.key(seed))
    if (out['mix_lam'] == 1).all():
      unmixed += 1
      np.testing.assert_array_equal(out['image'], batch['image'])
  assert 0 < unmixed < 8


def test_classify_with_mix_lam():
  logits = jax.random.normal(jax.random.key(0), (4, 5))
  outputs, batch = dict(class_logits=logits), _batch()
  loss = lambda b: objectives.classify(outputs, b, label_smoothing=0.1)[0]
  rolled = dict(batch, label=jnp.roll(batch['label'], 1))
  np.testing.assert_allclose(loss(dict(batch, mix_lam=jnp.ones(4))), loss(batch), rtol=1e-6)
  np.testing.assert_allclose(loss(dict(batch, mix_lam=jnp.full(4, 0.5))),
                             (loss(batch) + loss(rolled)) / 2, rtol=1e-6)
  acc = objectives.classify(outputs, dict(batch, mix_lam=jnp.full(4, 0.5)))[1]['acc']
  assert acc == objectives.classify(outputs, batch)[1]['acc']


def test_batch_fn_off_and_config_errors():
  assert mixing.batch_fn(ml_collections.ConfigDict(dict(objectives=dict(classify=1.0)))) is None
  assert mixing.batch_fn(_mix_config(mixup=0.0, cutmix=0.0)) is None
  assert mixing.batch_fn(_mix_config(mixup=0.2, prob=0.0)) is None
  with pytest.raises(ValueError, match='config.mix.mixpu'):
    mixing.batch_fn(_mix_config(mixpu=0.2))
  with pytest.raises(ValueError, match='config.mix.prob'):
    mixing.batch_fn(_mix_config(mixup=0.2, prob=1.5))
  with pytest.raises(ValueError, match='config.mix.cutmix'):
    mixing.batch_fn(_mix_config(cutmix=-1.0))
  with pytest.raises(ValueError, match='classify'):
    mixing.batch_fn(ml_collections.ConfigDict(dict(mix=dict(mixup=0.2),
                                                   objectives=dict(contrastive=1.0))))


# ---- the config token, end to end ----

def test_augment_token_only_adds_augmentation():
  plain, aug = load_config('finetune_digits:tiny'), load_config('finetune_digits:tiny,augment')
  assert plain.mix.mixup == plain.mix.cutmix == 0.0 and 'randaugment' not in plain.data.augment
  assert aug.data.augment.randaugment.to_dict() == dict(num_ops=2, magnitude=9)
  assert aug.mix.to_dict() == dict(mixup=0.2, cutmix=1.0, prob=0.5, switch_prob=0.5)


def test_finetune_digits_with_augment_trains(tmp_path):
  mmjax.train(load_config('finetune_digits:tiny,augment'), tmp_path, progress=False)
  losses = [m['loss'] for m in read_metrics(tmp_path) if m['kind'] == 'train']
  assert losses and all(math.isfinite(x) for x in losses)
