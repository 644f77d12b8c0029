"""What keeps decoding cheap: with a KV cache, self-attention projects q, k and v with
its own kernels (no concatenated copy of them per decode call), and the result is the
fused projection's; the prefill runs the LM head at each prompt's last real token only,
and its logits are those of the head at every position."""
import functools

import chex
import jax
import numpy as np
import pytest

from mmjax.generate.decode import prefill
from mmjax.models.model import MultimodalModel
from mmjax.models.text import TextEncoder
from mmjax.models.vit import ViT

V, D, P = 37, 32, 5


def _lm():
  tower = TextEncoder(V, 16, width=D, depth=2, heads=4, mlp_dim=64, pool="eos", causal=True,
                      act="gelu_tanh", ln_eps=1e-5, head="lm")
  model = MultimodalModel(image_tower=None, text_tower=tower)
  ids = np.random.default_rng(0).integers(0, V, (2, P)).astype(np.int32)
  mask = np.ones_like(ids)
  return model, model.init(jax.random.key(0), ids, mask, method="encode_text"), ids, mask


def _concatenated_kernels(jaxpr) -> int:
  """Concatenations into a [D, 3D] array anywhere in the jaxpr (sub-jaxprs included)."""
  found = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "concatenate" and eqn.outvars[0].aval.shape == (D, 3 * D):
      found += 1
    for sub in jax.core.jaxprs_in_params(eqn.params):
      found += _concatenated_kernels(sub)
  return found


def test_a_cached_call_does_not_concatenate_the_qkv_kernels_and_matches_the_full_pass():
  model, variables, ids, mask = _lm()
  cache = model.text_tower.empty_cache(2, P)
  cached = lambda v: model.apply(v, ids, mask, cache, method="decode_text")["logits"]
  full = lambda v: model.apply(v, ids, mask, method="encode_text")[1]["logits"]
  assert _concatenated_kernels(jax.make_jaxpr(cached)(variables).jaxpr) == 0
  assert _concatenated_kernels(jax.make_jaxpr(full)(variables).jaxpr) == 2   # one per block
  np.testing.assert_allclose(cached(variables), full(variables), atol=1e-5, rtol=1e-5)


# --- the prefill's LM head --------------------------------------------------------------

B, PROMPT_LENGTHS = 3, (5, 2, 1)
DECODERS = ("lm", "lm_untied", "cross", "image_prefix")


@functools.lru_cache(maxsize=None)
def _decoder(kind: str):
  """A tiny decoder of each kind: text only (tied or own LM head), cross-attention into
  image tokens (a captioner), or image tokens as its prefix (PaliGemma, a prefix-LM)."""
  image = ViT(image_size=8, patch=4, width=16, depth=1, heads=2, mlp_dim=32)
  text = TextEncoder(V, 16, width=D, depth=2, heads=4, mlp_dim=64, pool="eos", causal=True,
                     head="lm", tie_embed=kind != "lm_untied", cross=kind == "cross",
                     image_prefix=5 if kind == "image_prefix" else 0)
  if kind.startswith("lm"):
    model = MultimodalModel(image_tower=None, text_tower=text)
  else:
    model = MultimodalModel(image, text, caption=True, prefix_lm=kind == "image_prefix")
  r = np.random.default_rng(1)
  mask = (np.arange(P)[None] < np.array(PROMPT_LENGTHS)[:, None]).astype(np.int32)
  batch = dict(image=r.normal(size=(B, 8, 8, 3)).astype(np.float32),
               text=r.integers(0, V, (B, P)).astype(np.int32), text_mask=mask,
               prefix_len=mask.sum(1).astype(np.int32))
  if model.image_tower is None:
    variables = model.init(jax.random.key(0), batch["text"], mask, method="encode_text")
  else:
    variables = jax.jit(model.init)(jax.random.key(0), batch)
  return model, {"params": variables["params"]}, batch


def _logit_shaped(jaxpr, shapes) -> list:
  """Values of any of `shapes` anywhere in the jaxpr (sub-jaxprs included)."""
  found = [v.aval.shape for eqn in jaxpr.eqns for v in eqn.outvars
           if getattr(v.aval, "shape", None) in shapes]
  for eqn in jaxpr.eqns:
    for sub in jax.core.jaxprs_in_params(eqn.params):
      found += _logit_shaped(sub, shapes)
  return found


@pytest.mark.parametrize("kind", DECODERS)
def test_prefill_runs_the_lm_head_at_the_last_real_token_only(kind):
  model, variables, batch = _decoder(kind)
  images = None if model.image_tower is None else batch["image"]
  prefix = batch["prefix_len"] if model.prefix_lm else None

  def memory(v, images):
    return None if images is None else model.apply(v, images, method="image_memory")

  @jax.jit
  def ours(v, ids, mask, images):
    return prefill(model, v, ids, mask, ids.shape[1] + 2, memory(v, images))[0]

  def every_position(v, ids, mask, images):       # the head on all [B, P] positions
    cache = model.text_tower.empty_cache(ids.shape[0], ids.shape[1] + 2)
    return model.apply(v, ids, mask, cache, image_tokens=memory(v, images),
                       prefix_len=prefix, method="decode_text")["logits"]

  ids, mask = batch["text"], batch["text_mask"]
  got = np.asarray(ours(variables, ids, mask, images))
  chex.assert_shape(got, (B, V))
  full = np.asarray(jax.jit(every_position)(variables, ids, mask, images))
  np.testing.assert_allclose(got, full[np.arange(B), mask.sum(1) - 1], atol=1e-5, rtol=0)
  # Junk after the real tokens changes nothing.
  junk = np.random.default_rng(2).integers(0, V, (B, 3)).astype(np.int32)
  longer = ours(variables, np.concatenate([ids, junk], 1),
                np.concatenate([mask, np.zeros_like(junk)], 1), images)
  np.testing.assert_allclose(longer, got, atol=1e-5, rtol=0)
  # No [B, P, V] (or [B * P, V]) value is ever made; the all-positions path makes one.
  shapes = ((B, P, V), (B * P, V))
  assert not _logit_shaped(jax.make_jaxpr(ours)(variables, ids, mask, images).jaxpr, shapes)
  assert _logit_shaped(jax.make_jaxpr(every_position)(variables, ids, mask, images).jaxpr,
                       shapes)
