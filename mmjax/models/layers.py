"""Building blocks shared by every tower: Dense, attention, MLP, pre-LN block.

Shapes: B batch, L query tokens, S key tokens, D width, H heads, K head dim.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "relu": nn.relu,
}


@jax.custom_vjp
def _matmul(x: Array, w: Array) -> Array:
  """x [..., I] @ w [I, O] -> [..., O]."""
  return jnp.einsum("...i,io->...o", x, w)


def _matmul_fwd(x, w):
  return _matmul(x, w), (x, w)


def _matmul_bwd(res, dy):
  # Written out so that XLA:CPU emits one GEMM per gradient over the
  # flattened batch instead of transposing copies of the running gradient
  # for the weight gradient (PERF_NOTES_CPU.md: 946 -> 723 ms/step).
  x, w = res
  x2 = x.reshape(-1, x.shape[-1])
  dy2 = dy.reshape(-1, dy.shape[-1])
  dx = jnp.dot(dy2, w.T.astype(dy2.dtype)).reshape(x.shape)
  dw = jnp.dot(x2.T, dy2.astype(x2.dtype))
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nn.Module):
  """Dense layer over the last axis: kernel [I, O], bias [O].

  Params are kept in `param_dtype`; the product runs in `dtype`.
  """
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    y = _matmul(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Attention(nn.Module):
  """Multi-head attention; queries from `x`, keys/values from `kv` (self if None).

  `mask` is boolean, broadcastable to [B, H, L, S]; True = may attend.
  Logits and softmax run in float32 whatever the compute dtype.
  """
  heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv: Array | None = None, mask: Array | None = None,
               *, train: bool = False) -> Array:
    kv = x if kv is None else kv
    d = x.shape[-1]
    if d % self.heads:
      raise ValueError(f"width {d} is not divisible by heads={self.heads}")
    k_dim = d // self.heads
    dense = functools.partial(Dense, d, dtype=self.dtype)
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, k_dim)
    q = split(dense(name="query")(x))   # [B, L, H, K]
    k = split(dense(name="key")(kv))    # [B, S, H, K]
    v = split(dense(name="value")(kv))  # [B, S, H, K]
    logits = jnp.einsum("blhk,bshk->bhls", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(k_dim).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout)(weights, deterministic=not train)
    out = jnp.einsum("bhls,bshk->blhk", weights, v).reshape(*x.shape[:-1], d)
    return dense(name="out")(out)


class Mlp(nn.Module):
  mlp_dim: int
  act: str = "gelu"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    d = x.shape[-1]
    x = Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    x = ACTIVATIONS[self.act](x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return Dense(d, dtype=self.dtype, name="fc2")(x)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(kept, x / keep, jnp.zeros_like(x))


class Block(nn.Module):
  """Pre-LN Transformer block: self-attention, optional cross-attention, MLP.

  `post_norm=True` is the original (BERT) layout instead: LayerNorm after each
  residual sum, with the same parameter names.
  """
  heads: int
  mlp_dim: int
  act: str = "gelu"
  cross: bool = False
  dropout: float = 0.0
  drop_path: float = 0.0
  ln_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  post_norm: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, *, kv: Array | None = None,
               kv_mask: Array | None = None, train: bool = False) -> Array:
    norm = functools.partial(nn.LayerNorm, epsilon=self.ln_eps, dtype=self.dtype)
    attn = functools.partial(Attention, self.heads, self.dropout, self.dtype)
    residual = lambda y: nn.Dropout(self.dropout)(DropPath(self.drop_path)(y, train=train),
                                                  deterministic=not train)
    mlp = Mlp(self.mlp_dim, self.act, self.dropout, self.dtype, name="mlp")
    if self.post_norm:
      if self.cross:
        raise ValueError("post_norm blocks have no cross-attention")
      x = norm(name="ln1")(x + residual(attn(name="attn")(x, mask=mask, train=train)))
      return norm(name="ln2")(x + residual(mlp(x, train=train)))
    x = x + residual(attn(name="attn")(norm(name="ln1")(x), mask=mask, train=train))
    if self.cross:
      x = x + residual(attn(name="cross_attn")(norm(name="ln_cross")(x), kv, kv_mask,
                                               train=train))
    return x + residual(mlp(norm(name="ln2")(x), train=train))


class Encoder(nn.Module):
  """A stack of `depth` blocks (`block_0` ... at the bottom) and a final LayerNorm.

  Stochastic depth grows linearly from 0 at the bottom to `drop_path` at the top.
  """
  depth: int
  heads: int
  mlp_dim: int
  act: str = "gelu"
  cross: bool = False
  dropout: float = 0.0
  drop_path: float = 0.0
  ln_eps: float = 1e-6
  final_norm: bool = True
  dtype: Dtype = jnp.float32
  post_norm: bool = False    # BERT-style blocks (see Block)

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, *, kv: Array | None = None,
               kv_mask: Array | None = None, train: bool = False) -> Array:
    for i in range(self.depth):
      rate = self.drop_path * i / max(self.depth - 1, 1)
      x = Block(self.heads, self.mlp_dim, self.act, self.cross, self.dropout, rate,
                self.ln_eps, self.dtype, self.post_norm, name=f"block_{i}")(
                    x, mask, kv=kv, kv_mask=kv_mask, train=train)
    if self.final_norm:
      x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_final")(x)
    return x


def key_mask(mask: Array) -> Array:
  """[B, S] 0/1 validity -> boolean attention mask [B, 1, 1, S]."""
  return mask.astype(bool)[:, None, None, :]
