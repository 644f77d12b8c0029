"""Dense layers, the one matmul of every tower: their custom-VJP product, LoRA and the
PEFT settings that configure it, and the constraint that splits their outputs over the
`model` mesh axis under tensor parallelism.

Shapes: I input features, O output features, r LoRA rank.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
Dtype = Any


# The name of a Dense layer's product, which the dots_* remat policies keep
# (layers.REMAT_POLICIES).
DENSE_OUT = "dense_out"


@jax.custom_vjp
def _matmul(x: Array, w: Array) -> Array:
  """x [..., I] @ w [I, O] -> [..., O]."""
  return jnp.einsum("...i,io->...o", x, w)


def _matmul_fwd(x, w):
  return _matmul(x, w), (x, w)


def _matmul_bwd(res, dy):
  # Written out so that XLA:CPU emits one GEMM per gradient over the
  # flattened batch instead of transposing copies of the running gradient
  # for the weight gradient (docs/cpu_performance.md: 946 -> 723 ms/step).
  x, w = res
  x2 = x.reshape(-1, x.shape[-1])
  dy2 = dy.reshape(-1, dy.shape[-1])
  dx = jnp.dot(dy2, w.T.astype(dy2.dtype)).reshape(x.shape)
  dw = jnp.dot(x2.T, dy2.astype(x2.dtype))
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)

# qwix (mmjax/models/quantized.py) quantizes a matmul whose operand it recognises as the
# module's own param; the custom_vjp's traced copy and the fused q/k/v concatenation hide
# it, so a quantized model runs each Dense as a plain einsum on its own kernel.
_PLAIN = contextvars.ContextVar("mmjax_plain_matmuls", default=False)


@contextlib.contextmanager
def plain_matmuls():
  """Within: every Dense multiplies by its own kernel with jnp.einsum (the same forward;
  JAX's default backward), and self-attention projects q, k and v as three Dense layers."""
  token = _PLAIN.set(True)
  try:
    yield
  finally:
    _PLAIN.reset(token)


def matmuls_are_plain() -> bool:
  """Whether the code being traced runs under `plain_matmuls`."""
  return _PLAIN.get()


def dense_matmul(x: Array, w: Any, dtype: Dtype) -> Array:
  """x [..., I] @ w [I, O] in `dtype`; under plain_matmuls `w` may be a qwix quantized
  weight (not an array), which qwix's einsum reads as it is."""
  if _PLAIN.get():
    w = w.astype(dtype) if isinstance(w, jax.Array) else w
    return jnp.einsum("...i,io->...o", x.astype(dtype), w)
  return checkpoint_name(_matmul(x.astype(dtype), w.astype(dtype)), DENSE_OUT)


@dataclasses.dataclass(frozen=True)
class Peft:
  """Parameter-efficient fine-tuning parts of every Transformer block (all off by default).

  lora_rank > 0: the Dense layers named in `lora_targets` (query, key, value, out of
    every attention; fc1, fc2 of every MLP) add (lora_alpha / lora_rank) * x A B, with
    B zero-initialised, so a model with LoRA starts out equal to the one without.
  adapter_dim > 0: a bottleneck adapter (Houlsby) on each block's attention and MLP
    output, its up-projection zero-initialised (the adapter starts as the identity).
  """
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("query", "value")
  adapter_dim: int = 0

  def lora(self, name: str) -> dict[str, Any]:
    """Dense kwargs for the layer called `name`."""
    rank = self.lora_rank if name in self.lora_targets else 0
    return dict(lora_rank=rank, lora_alpha=self.lora_alpha)


class Dense(nn.Module):
  """Dense layer over the last axis: kernel [I, O], bias [O] (+ LoRA A [I, r], B [r, O]).

  Params are kept in `param_dtype`; the product runs in `dtype`.
  """
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros
  lora_rank: int = 0
  lora_alpha: float = 16.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    y = dense_matmul(x, kernel, self.dtype)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora_rank:
      # A as torch's Linear default (uniform, bound 1/sqrt(I)); B = 0: no change at init.
      a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
      a = self.param("lora_a", a_init, (x.shape[-1], self.lora_rank), self.param_dtype)
      b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, self.features),
                     self.param_dtype)
      low = dense_matmul(x, a, self.dtype)                                  # [..., r]
      y = y + (self.lora_alpha / self.lora_rank) * dense_matmul(low, b, self.dtype)
    return y


class DenseParams(nn.Module):
  """A Dense layer's kernel [I, O] and bias [O] (same names and initialisers), not
  applied: layers that read the same input then run as one GEMM (attention.Attention)."""
  features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features: int) -> tuple[Array, Array]:
    return (self.param("kernel", Dense.kernel_init, (in_features, self.features),
                       self.param_dtype),
            self.param("bias", Dense.bias_init, (self.features,), self.param_dtype))


# The mesh axes (mmjax/parallel.py) that split the batch, and the one that splits heads and
# hidden units under tensor parallelism. Only `constrain` reads them.
BATCH_AXES, MODEL_AXIS = ("data", "fsdp"), "model"


def tensor_parallel() -> bool:
  """Whether the mesh being traced under (parallel.in_mesh) has a `model` axis > 1."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and dict(mesh.shape).get(MODEL_AXIS, 1) > 1


def constrain(x: Array, dim: int) -> Array:
  """x [B, ...] with its batch over the batch axes and dimension `dim` over the `model`
  axis under tensor parallelism, so that XLA keeps those activations split; x itself
  otherwise (one device, data parallelism, no mesh)."""
  if not tensor_parallel():
    return x
  mesh = jax.sharding.get_abstract_mesh()
  spec = [None] * x.ndim
  spec[0] = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  spec[dim] = MODEL_AXIS
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))
