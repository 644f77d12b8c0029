import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.models import build_model
from mmjax.models.fusion import Fusion
from mmjax.models.text import TextEncoder
from mmjax.models.vit import ViT, resample_posemb

B, S, L, V = 3, 16, 8, 40


def tiny_config(mode="merged", dtype="float32"):
  t = lambda **kw: dict(variant="mu", **kw)
  return ml_collections.ConfigDict(dict(
      data=dict(image_size=S, max_len=L),
      model=dict(image=t(patch=4), text=t(pool="cls"), fusion=t(mode=mode), embed_dim=16,
                 dtype=dtype),
      objectives=dict(contrastive=1.0, itm=1.0, mlm=1.0)))


def batch(rng=0):
  r = np.random.default_rng(rng)
  ids = r.integers(5, V, (B, L)).astype(np.int32)
  lengths = np.array([L, 5, 3])
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask, ids, 0)
  ids[:, 0] = 2
  return {"image": r.normal(size=(B, S, S, 3)).astype(np.float32), "text": ids,
          "text_mask": mask}


def rngs(i=0):
  return dict(zip(("params", "dropout", "itm", "mlm"), jax.random.split(jax.random.key(i), 4)))


def test_vit_shapes_and_pooling():
  x = jnp.zeros((B, S, S, 3))
  for pool, n in (("cls", 17), ("gap", 16)):
    vit = ViT(width=32, depth=1, heads=2, mlp_dim=64, patch=4, image_size=S, pool=pool)
    out, _ = vit.init_with_output(jax.random.key(0), x)
    chex.assert_shape(out["tokens"], (B, n, 32))
    chex.assert_shape(out["pooled"], (B, 32))


def test_vit_resamples_position_embeddings_for_new_resolution():
  vit = ViT(width=32, depth=1, heads=2, mlp_dim=64, patch=4, image_size=S)
  params = vit.init(jax.random.key(0), jnp.zeros((1, S, S, 3)))
  out = vit.apply(params, jnp.zeros((2, 2 * S, 2 * S, 3)))
  chex.assert_shape(out["tokens"], (2, 1 + 64, 32))
  pe = params["params"]["posemb"]
  chex.assert_trees_all_equal(resample_posemb(pe, (4, 4)), pe)   # same grid: untouched
  up = resample_posemb(pe, (8, 8))
  chex.assert_shape(up, (1, 64, 32))
  # Bilinear resampling keeps the mean embedding.
  np.testing.assert_allclose(up.mean(axis=1), pe.mean(axis=1), atol=1e-2)


def test_text_padding_does_not_change_real_tokens():
  enc = TextEncoder(vocab_size=V, max_len=16, width=32, depth=2, heads=2, mlp_dim=64,
                    pool="mean")
  ids = jnp.array([[2, 7, 9, 11, 3]])
  params = enc.init(jax.random.key(0), ids, jnp.ones_like(ids))
  short = enc.apply(params, ids, jnp.ones_like(ids))
  padded_ids = jnp.concatenate([ids, jnp.full((1, 6), 17)], axis=1)   # junk under the mask
  mask = jnp.concatenate([jnp.ones((1, 5), jnp.int32), jnp.zeros((1, 6), jnp.int32)], axis=1)
  long = enc.apply(params, padded_ids, mask)
  np.testing.assert_allclose(long["tokens"][:, :5], short["tokens"], atol=1e-5)
  np.testing.assert_allclose(long["pooled"], short["pooled"], atol=1e-5)


def test_causal_text_ignores_future_tokens():
  enc = TextEncoder(vocab_size=V, max_len=8, width=32, depth=1, heads=2, mlp_dim=64,
                    causal=True)
  a = jnp.array([[2, 5, 6, 7]])
  b = jnp.array([[2, 5, 9, 10]])
  params = enc.init(jax.random.key(0), a, jnp.ones_like(a))
  ta = enc.apply(params, a, jnp.ones_like(a))["tokens"]
  tb = enc.apply(params, b, jnp.ones_like(b))["tokens"]
  np.testing.assert_allclose(ta[:, :2], tb[:, :2], atol=1e-6)
  assert not np.allclose(ta[:, 2:], tb[:, 2:])


@pytest.mark.parametrize("mode", ["merged", "cross"])
def test_fusion_modes(mode):
  f = Fusion(mode=mode, width=32, depth=1, heads=2, mlp_dim=64)
  text, image = jnp.ones((B, L, 24)), jnp.ones((B, 5, 48))      # widths differ from 32
  out, params = f.init_with_output(jax.random.key(0), text, jnp.ones((B, L)), image)
  chex.assert_shape(out, (B, L, 32))
  assert ("cross_attn" in params["params"]["encoder"]["block_0"]) == (mode == "cross")


@pytest.mark.parametrize("mode", ["merged", "cross"])
def test_model_outputs(mode):
  model = build_model(tiny_config(mode), vocab_size=V)
  bt = batch()
  params = model.init(rngs(), bt)["params"]
  out = model.apply({"params": params}, bt, train=True, rngs=rngs(1))
  chex.assert_shape([out["image_emb"], out["text_emb"]], (B, 16))
  np.testing.assert_allclose(np.linalg.norm(out["text_emb"], axis=-1), 1.0, atol=1e-4)
  chex.assert_shape(out["itm_logits"], (3 * B, 2))
  np.testing.assert_array_equal(out["itm_labels"], [1] * B + [0] * 2 * B)
  chex.assert_shape(out["mlm_logits"], (B, L, V))
  chex.assert_type(out["mlm_logits"], jnp.float32)
  # Only real, non-special tokens are ever picked for MLM.
  w = np.asarray(out["mlm_weights"])
  assert not w[np.asarray(bt["text_mask"]) == 0].any()
  assert not w[:, 0].any()


def test_bfloat16_compute_keeps_float32_params():
  # Jitted: op by op, every bfloat16 op compiles a program of its own (twice the CPU).
  model = build_model(tiny_config(dtype="bfloat16"), vocab_size=V)
  bt = batch()
  params = jax.jit(model.init)(rngs(), bt)["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out = jax.jit(lambda p, b, r: model.apply({"params": p}, b, train=False, rngs=r))(
      params, bt, rngs(1))
  # Losses see float32; the heavy towers ran in bfloat16.
  chex.assert_type([out["image_emb"], out["itm_logits"], out["mlm_logits"]], jnp.float32)
  _, tower = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))(
      params, bt["image"])
  chex.assert_type(tower["tokens"], jnp.bfloat16)


def test_named_sizes_and_bad_variant():
  from mmjax.models import tower_size
  assert tower_size(ml_collections.ConfigDict(dict(variant="B/16"))) == dict(
      width=768, depth=12, mlp_dim=3072, heads=12, patch=16)
  with pytest.raises(ValueError, match="unknown size 'Q'"):
    tower_size(ml_collections.ConfigDict(dict(variant="Q/16")))
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.model.fusion = None
  with pytest.raises(ValueError, match="need model.fusion"):
    build_model(cfg, vocab_size=V)


def test_fused_self_attention_equals_separate_query_key_value():
  """Self-attention runs q/k/v as one GEMM; params, outputs and grads match the
  separate Dense path (taken when keys come from another array)."""
  from mmjax.models.attention import Attention
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 8))
  attn = Attention(heads=2)
  fused = attn.init(jax.random.PRNGKey(0), x)
  separate = attn.init(jax.random.PRNGKey(0), x, x + 0)
  chex.assert_trees_all_equal(fused, separate)
  chex.assert_trees_all_close(attn.apply(fused, x), attn.apply(fused, x, x + 0), atol=1e-5)
  grad = lambda kv: jax.grad(lambda p: attn.apply(p, x, kv).sum())(fused)
  chex.assert_trees_all_close(grad(None), grad(x + 0), atol=1e-5)


def test_tower_splits_give_the_same_embeddings():
  """model.tower_splits runs the towers on slices of the batch (B=3 in 2: 2 + 1)."""
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.model.fusion, cfg.objectives = None, ml_collections.ConfigDict(dict(contrastive=1.0))
  whole = build_model(cfg, vocab_size=V)
  with cfg.unlocked():
    cfg.model.tower_splits = 2
  split = build_model(cfg, vocab_size=V)
  bt = batch()
  params = whole.init(rngs(), bt)["params"]
  chex.assert_trees_all_equal_shapes(params, split.init(rngs(), bt)["params"])
  a, b = (m.apply({"params": params}, bt) for m in (whole, split))
  chex.assert_trees_all_close((a["image_emb"], a["text_emb"]),
                              (b["image_emb"], b["text_emb"]), atol=1e-5)
