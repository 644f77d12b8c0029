import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import objectives
from mmjax.models.model import hard_negatives, mask_tokens


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _pairs(b=8, d=16, seed=0):
  r = np.random.default_rng(seed)
  img = _unit(r.normal(size=(b, d)))
  txt = _unit(img + 0.1 * r.normal(size=(b, d)))
  ids = np.arange(b)[:, None] * np.ones((1, 4), int)      # all captions different
  return jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), {"text": jnp.asarray(ids)}


@pytest.mark.parametrize("name", ["contrastive", "sigmoid"])
def test_aligned_pairs_score_better_than_shuffled(name):
  img, txt, batch = _pairs()
  out = {"image_emb": img, "logit_scale": jnp.float32(10.0), "logit_bias": jnp.float32(-5.0)}
  aligned, _ = objectives.get(name)(dict(out, text_emb=txt), batch)
  shuffled, _ = objectives.get(name)(dict(out, text_emb=txt[::-1]), batch)
  assert aligned < shuffled - 1.0


def test_contrastive_treats_identical_captions_as_positives():
  img, txt, _ = _pairs(b=4)
  # Rows 0 and 1 share a caption: swapping their texts must not change the loss.
  batch = {"text": jnp.array([[5, 6], [5, 6], [7, 8], [9, 9]])}
  out = {"image_emb": img, "logit_scale": jnp.float32(10.0)}
  base, m = objectives.contrastive(dict(out, text_emb=txt), batch)
  swapped, _ = objectives.contrastive(dict(out, text_emb=txt[jnp.array([1, 0, 2, 3])]), batch)
  np.testing.assert_allclose(base, swapped, rtol=1e-6)
  assert 0.0 <= float(m["i2t_acc"]) <= 1.0


def test_hard_negatives_are_never_positives():
  b = 16
  r = np.random.default_rng(0)
  texts = r.integers(0, 4, size=b)                  # many duplicate captions
  same = jnp.asarray(texts[:, None] == texts[None, :])
  sim = jnp.asarray(r.normal(size=(b, b)), jnp.float32)
  for seed in range(20):
    neg = np.asarray(hard_negatives(sim, same, jax.random.key(seed)))
    assert not np.asarray(same)[np.arange(b), neg].any()


def test_hard_negatives_prefer_similar_items():
  b = 6
  same = jnp.eye(b, dtype=bool)
  sim = jnp.full((b, b), -10.0).at[:, 3].set(10.0).at[3, 4].set(10.0)
  neg = hard_negatives(sim, same, jax.random.key(0))
  np.testing.assert_array_equal(neg, [3, 3, 3, 4, 3, 3])


def test_mask_tokens_only_touches_real_non_special_tokens():
  ids = jnp.array([[2, 10, 11, 12, 13, 3, 0, 0]] * 64)
  mask = (ids != 0).astype(jnp.int32)
  masked, w = mask_tokens(ids, mask, jax.random.key(0), prob=0.5, mask_id=4, vocab_size=20,
                          special_ids=(0, 2, 3))
  w = np.asarray(w)
  assert w[:, [0, 5, 6, 7]].sum() == 0
  assert 0.35 < w[:, 1:5].mean() < 0.65
  changed = np.asarray(masked != ids)
  assert not changed[w == 0].any()
  assert (np.asarray(masked)[w == 1] == 4).mean() > 0.6     # ~80% become [MASK]


def test_itm_and_mlm_losses():
  logits = jnp.array([[-5.0, 5.0], [5.0, -5.0]])
  loss, m = objectives.itm({"itm_logits": logits, "itm_labels": jnp.array([1, 0])}, {})
  assert float(loss) < 1e-3 and float(m["acc"]) == 1.0
  targets = jnp.array([[1, 2, 3]])
  perfect = jax.nn.one_hot(targets, 5) * 20.0
  out = {"mlm_logits": perfect, "mlm_targets": targets, "mlm_weights": jnp.array([[0., 1., 1.]])}
  loss, m = objectives.mlm(out, {})
  assert float(loss) < 1e-3 and float(m["acc"]) == 1.0
  wrong = dict(out, mlm_logits=jax.nn.one_hot(targets + 1, 5) * 20.0)
  assert float(objectives.mlm(wrong, {})[0]) > 10.0


def test_combined_weights_and_prefixes():
  img, txt, batch = _pairs()
  out = {"image_emb": img, "text_emb": txt, "logit_scale": jnp.float32(10.0),
         "logit_bias": jnp.float32(-5.0)}
  total, m = objectives.combined({"contrastive": 1.0, "sigmoid": 0.5})(out, batch)
  np.testing.assert_allclose(total, m["contrastive_loss"] + 0.5 * m["sigmoid_loss"], rtol=1e-6)
  with pytest.raises(KeyError, match="unknown objective 'clip'"):
    objectives.combined({"clip": 1.0})
