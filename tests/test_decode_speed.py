"""What keeps a decode step cheap: with a KV cache, self-attention projects q, k and v with
its own kernels (no concatenated copy of them per decode call), and the result is the
fused projection's."""
import jax
import numpy as np

from mmjax.models.model import MultimodalModel
from mmjax.models.text import TextEncoder

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
