"""The activations' custom VJPs (layers.keeps_input): the forward is the plain formula bit
for bit, the gradient is autodiff's, and the backward pass keeps only the input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.layers import ACTIVATIONS, FORMULAS as PLAIN, Encoder


def _inputs(dtype):
  r = np.random.default_rng(0)
  x = np.concatenate([r.normal(size=2000) * 4, np.linspace(-60, 60, 241),
                      [0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4, 1e9, -1e9]])
  return jnp.asarray(x, dtype)


def _grad(fn, x):
  return jax.jit(jax.vmap(jax.grad(fn)))(x)


@pytest.mark.parametrize("name", sorted(PLAIN))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_is_the_plain_formula(name, dtype):
  x = _inputs(dtype).reshape(13, -1)
  np.testing.assert_array_equal(jax.jit(ACTIVATIONS[name])(x), jax.jit(PLAIN[name])(x))
  np.testing.assert_array_equal(ACTIVATIONS[name](x), PLAIN[name](x))


def _exact_slope(name, x):
  """The derivative in float64 (numpy)."""
  x = np.asarray(x, np.float64)
  if name == "quick_gelu":
    s = 0.5 * (1 + np.tanh(0.851 * x))                    # sigmoid(1.702 x)
    return s + 1.702 * x * s * (1 - s)
  if name == "gelu":
    return 0.5 * np.vectorize(math.erfc)(-x / math.sqrt(2)) + x * np.exp(-x * x / 2) / math.sqrt(
        2 * math.pi)
  c, k = math.sqrt(2 / math.pi), 0.044715
  t = np.tanh(c * (x + k * x ** 3))
  return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * k * x * x)


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_gradient_is_autodiffs(name):
  x = _inputs(jnp.float32)
  got, autodiff = _grad(ACTIVATIONS[name], x), _grad(PLAIN[name], x)
  exact = _exact_slope(name, x)
  # Float32 rounding of a slope of size ~1 (the gelus' slopes stay within [-0.2, 1.2]).
  np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-6)
  assert np.abs(got - exact).max() <= np.abs(autodiff - exact).max() + 1e-7
  # gelu_tanh: autodiff's own float32 error (1 - tanh^2 near |tanh| = 1) reaches 9.3e-6.
  np.testing.assert_allclose(got, autodiff, rtol=1e-6, atol=1e-6 if name != "gelu_tanh" else 1e-5)


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_bfloat16_gradient(name):
  """In bfloat16 the derivative is computed in float32 and rounded once: within bfloat16's
  rounding of the exact slope, and no further from it than autodiff in bfloat16."""
  x = _inputs(jnp.bfloat16)
  got = _grad(ACTIVATIONS[name], x)
  assert got.dtype == jnp.bfloat16
  exact = _exact_slope(name, x.astype(jnp.float32))
  err = np.abs(np.asarray(got, np.float64) - exact)
  np.testing.assert_array_less(err, 2.0 ** -8 * np.abs(exact) + 1e-5)
  autodiff = np.abs(np.asarray(_grad(PLAIN[name], x), np.float64) - exact)
  assert err.max() <= autodiff.max()


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("name", sorted(PLAIN))
def test_backward_keeps_only_the_input(name, scan, monkeypatch):
  """The vjp's residuals are x alone, and an Encoder's gradient, scanned or unrolled, needs
  at least one [B, L, H] less temporary memory per block than with autodiff's residuals
  (measured here: 3.2 to 6 of them in all). Unrolled, the saving is lost if XLA merges the
  backward's recomputation with the forward's (CSE)."""
  x = jnp.ones((2, 3, 8))
  residuals = jax.tree.leaves(jax.vjp(ACTIVATIONS[name], x)[1])
  assert [(r.shape, r.dtype) for r in residuals] == [(x.shape, x.dtype)]

  depth, (b, l, d, h) = 3, (4, 64, 64, 256)
  encoder = Encoder(depth=depth, heads=2, mlp_dim=h, act=name, scan_layers=scan)
  inputs = jax.ShapeDtypeStruct((b, l, d), jnp.float32)
  params = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), inputs)
  loss = lambda p, x: jnp.sum(encoder.apply(p, x) ** 2)

  def temp_bytes():
    compiled = jax.jit(jax.grad(loss)).lower(params, inputs).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  custom = temp_bytes()
  monkeypatch.setitem(ACTIVATIONS, name, PLAIN[name])
  saved = temp_bytes() - custom
  assert saved >= depth * b * l * h * 4, saved
