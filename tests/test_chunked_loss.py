"""Contrastive and sigmoid losses chunked over devices (mmjax/chunked_losses.py) equal the
gathered ones (mmjax/objectives.py): losses, metrics and gradients, on 8 devices."""
import jax
import numpy as np

from mmjax import chunked_losses, objectives
from conftest import run_python


def _outputs(batch=16, dim=8, length=4, seed=0):
  rng = np.random.default_rng(seed)
  emb = lambda: rng.normal(size=(batch, dim)).astype(np.float32)
  ids = rng.integers(0, 3, size=(batch, length)).astype(np.int32)
  ids[::5] = ids[1]                       # duplicate captions: several positives per row
  return (dict(image_emb=emb(), text_emb=emb(), logit_scale=np.float32(7.0),
               logit_bias=np.float32(-2.0)), {"text": ids})


def test_chunked_without_a_split_batch_is_the_gathered_loss():
  """Outside a mesh (evaluation, one device) `chunked=True` computes the gathered loss."""
  outputs, batch = _outputs()
  assert chunked_losses.ring_size() == 1
  for name in ("contrastive", "sigmoid"):
    fn = objectives.combined({name: 1.0}, {name: {"chunked": True}})
    got, want = jax.jit(fn)(outputs, batch), objectives.get(name)(outputs, batch)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)


def test_chunked_losses_and_gradients_equal_gathered_on_8_devices():
  code = r"""
import functools, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mmjax import chunked_losses, objectives, parallel

rng = np.random.default_rng(0)
B, D, L = 32, 16, 4
emb = lambda: rng.normal(size=(B, D)).astype(np.float32)
ids = rng.integers(0, 3, size=(B, L)).astype(np.int32)
ids[::5] = ids[1]                       # 7 copies of one caption, spread over devices
params = dict(img=emb(), txt=emb(), scale=np.float32(10.0), bias=np.float32(-3.0))

def loss(p, batch, name, chunked):
  out = dict(image_emb=p["img"], text_emb=p["txt"], logit_scale=p["scale"],
             logit_bias=p["bias"])
  if chunked:
    assert chunked_losses.ring_size() == ring
  return objectives.get(name)(out, batch, chunked=chunked)

for axes, ring in (({"data": 8}, 8), ({"data": 2, "fsdp": 2, "model": 2}, 4)):
  mesh = parallel.make_mesh(axes)
  for name in ("contrastive", "sigmoid"):
    got = {}
    for chunked in (False, True):
      f = jax.value_and_grad(functools.partial(loss, name=name, chunked=chunked), has_aux=True)
      f = jax.jit(parallel.in_mesh(f, mesh), in_shardings=(
          NamedSharding(mesh, P()), parallel.batch_sharding(mesh)))
      got[chunked] = jax.device_get(f(params, {"text": ids}))
    (l0, m0), g0 = got[False]
    (l1, m1), g1 = got[True]
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    assert m0.keys() == m1.keys()
    for k in m0:
      np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, err_msg=k)
    for k in g0:
      assert np.abs(g0[k]).max() > 0 or (name, k) == ("contrastive", "bias"), k
      np.testing.assert_allclose(g1[k], g0[k], rtol=1e-5, atol=1e-6, err_msg=k)
    print("equal", name, ring, float(l0))
"""
  r = run_python(code, devices=8, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("equal") == 4, r.stdout
