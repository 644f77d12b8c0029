"""Building blocks shared by every tower: Dense, attention, MLP, pre-LN block.

Shapes: B batch, L query tokens, S key tokens, D width, H heads, K head dim.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
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
  # for the weight gradient (docs/cpu_performance.md: 946 -> 723 ms/step).
  x, w = res
  x2 = x.reshape(-1, x.shape[-1])
  dy2 = dy.reshape(-1, dy.shape[-1])
  dx = jnp.dot(dy2, w.T.astype(dy2.dtype)).reshape(x.shape)
  dw = jnp.dot(x2.T, dy2.astype(x2.dtype))
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


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
    y = _matmul(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora_rank:
      # A as torch's Linear default (uniform, bound 1/sqrt(I)); B = 0: no change at init.
      a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
      a = self.param("lora_a", a_init, (x.shape[-1], self.lora_rank), self.param_dtype)
      b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, self.features),
                     self.param_dtype)
      low = _matmul(x.astype(self.dtype), a.astype(self.dtype))              # [..., r]
      y = y + (self.lora_alpha / self.lora_rank) * _matmul(low, b.astype(self.dtype))
    return y


class DenseParams(nn.Module):
  """A Dense layer's kernel [I, O] and bias [O] (same names and initialisers), not
  applied: layers that read the same input then run as one GEMM (see Attention)."""
  features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features: int) -> tuple[Array, Array]:
    return (self.param("kernel", Dense.kernel_init, (in_features, self.features),
                       self.param_dtype),
            self.param("bias", Dense.bias_init, (self.features,), self.param_dtype))


class Adapter(nn.Module):
  """x + up(act(down(x))): a bottleneck of width `dim`; `up` starts at zero."""
  dim: int
  act: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = ACTIVATIONS[self.act](Dense(self.dim, dtype=self.dtype, name="down")(x))
    return x + Dense(x.shape[-1], dtype=self.dtype, kernel_init=nn.initializers.zeros,
                     name="up")(h)


@flax.struct.dataclass
class KVCache:
  """The keys and values of a causal stack's past tokens, for decoding a few at a time.

  Slot t of row b holds the token at position t, so rows advance independently: a batch
  of prompts of different lengths (right-padded) decodes without left padding, each row
  exactly as if run alone. Slots at or after `index` hold stale values that the causal
  mask never reads. Every leaf has the batch on axis 0: shard it like the batch.
  """
  index: Array                 # [B] int32: tokens held = the next token's position
  keys: tuple[Array, ...]      # per block [B, T, H, K]
  values: tuple[Array, ...]    # per block [B, T, H, K]

  @classmethod
  def empty(cls, batch: int, length: int, depth: int, heads: int, head_dim: int,
            dtype: Dtype = jnp.float32) -> "KVCache":
    zeros = lambda: tuple(jnp.zeros((batch, length, heads, head_dim), dtype)
                          for _ in range(depth))
    return cls(jnp.zeros((batch,), jnp.int32), zeros(), zeros())

  @property
  def length(self) -> int:
    """T, the static number of slots."""
    return self.keys[0].shape[1]

  def positions(self, new: int) -> Array:
    """[B, new] absolute positions of `new` tokens appended to every row."""
    return self.index[:, None] + jnp.arange(new)[None]

  def causal_mask(self, new: int) -> Array:
    """[B, 1, new, T]: appended token i of row b sees slots up to its own position."""
    return (jnp.arange(self.length)[None, None] <= self.positions(new)[:, :, None])[:, None]


def write_rows(slots: Array, new: Array, start: Array) -> Array:
  """slots [B, T, ...] with new [B, L, ...] written at per-row offsets start [B].

  The caller keeps start + L <= T (dynamic_update_slice would clamp, not fail)."""
  put = lambda s, n, i: jax.lax.dynamic_update_slice_in_dim(s, n.astype(s.dtype), i, axis=0)
  return jax.vmap(put)(slots, new, start)


class Attention(nn.Module):
  """Multi-head attention; queries from `x`, keys/values from `kv` (self if None).

  `mask` is boolean, broadcastable to [B, H, L, S]; True = may attend.
  Logits and softmax run in float32 whatever the compute dtype.
  With `cache` = (keys, values [B, T, H, K], start [B]) (self-attention only), the new
  keys/values are written at slots start .. start+L-1, attention reads all T slots
  (`mask` [B, 1, L, T] says which), and the call returns (y, (keys, values)).
  """
  heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  peft: Peft = Peft()

  @nn.compact
  def __call__(self, x: Array, kv: Array | None = None, mask: Array | None = None,
               *, train: bool = False, cache: tuple[Array, Array, Array] | None = None):
    if cache is not None and kv is not None:
      raise ValueError("a KV cache is for self-attention only")
    kv = x if kv is None else kv
    d = x.shape[-1]
    if d % self.heads:
      raise ValueError(f"width {d} is not divisible by heads={self.heads}")
    k_dim = d // self.heads
    dense = lambda name: Dense(d, dtype=self.dtype, name=name, **self.peft.lora(name))
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, k_dim)
    names = ("query", "key", "value")
    if kv is x and not any(self.peft.lora(n)["lora_rank"] for n in names):
      # Self-attention: q, k, v as one GEMM over the concatenated kernels, same
      # params as three Dense layers (-7% train step time on CPU, BENCHMARKS.md).
      kernels, biases = zip(*(DenseParams(d, name=n)(d) for n in names))
      qkv = _matmul(x.astype(self.dtype), jnp.concatenate(kernels, 1).astype(self.dtype))
      q, k, v = map(split, jnp.split(qkv + jnp.concatenate(biases).astype(self.dtype), 3, -1))
    else:
      q = split(dense("query")(x))   # [B, L, H, K]
      k = split(dense("key")(kv))    # [B, S, H, K]
      v = split(dense("value")(kv))  # [B, S, H, K]
    if cache is not None:
      keys, values, start = cache
      k, v = write_rows(keys, k, start), write_rows(values, v, start)   # [B, T, H, K]
    logits = jnp.einsum("blhk,bshk->bhls", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(k_dim).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout)(weights, deterministic=not train)
    out = jnp.einsum("bhls,bshk->blhk", weights, v)
    y = dense("out")(out.reshape(*x.shape[:-1], d))
    return y if cache is None else (y, (k, v))


class Mlp(nn.Module):
  mlp_dim: int
  act: str = "gelu"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  peft: Peft = Peft()

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    d = x.shape[-1]
    x = Dense(self.mlp_dim, dtype=self.dtype, name="fc1", **self.peft.lora("fc1"))(x)
    x = ACTIVATIONS[self.act](x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return Dense(d, dtype=self.dtype, name="fc2", **self.peft.lora("fc2"))(x)


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
  peft: Peft = Peft()

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, *, kv: Array | None = None,
               kv_mask: Array | None = None, train: bool = False,
               cache: tuple[Array, Array, Array] | None = None):
    """With `cache` (see Attention), returns (x, the self-attention's (keys, values))."""
    norm = functools.partial(nn.LayerNorm, epsilon=self.ln_eps, dtype=self.dtype)
    attn = functools.partial(Attention, self.heads, self.dropout, self.dtype, self.peft)
    drop = lambda y: nn.Dropout(self.dropout)(DropPath(self.drop_path)(y, train=train),
                                              deterministic=not train)
    # Adapters sit on the branch output, before dropout and the residual sum.
    adapt = lambda name, y: (Adapter(self.peft.adapter_dim, self.act, self.dtype, name=name)(y)
                             if self.peft.adapter_dim else y)
    mlp = Mlp(self.mlp_dim, self.act, self.dropout, self.dtype, self.peft, name="mlp")

    def self_attn(y):
      out = attn(name="attn")(y, mask=mask, train=train, cache=cache)
      return out if cache is not None else (out, None)

    if self.post_norm:
      if self.cross:
        raise ValueError("post_norm blocks have no cross-attention")
      y, kv_out = self_attn(x)
      x = norm(name="ln1")(x + drop(adapt("adapter_attn", y)))
      x = norm(name="ln2")(x + drop(adapt("adapter_mlp", mlp(x, train=train))))
      return x if cache is None else (x, kv_out)
    y, kv_out = self_attn(norm(name="ln1")(x))
    x = x + drop(adapt("adapter_attn", y))
    if self.cross:
      x = x + drop(attn(name="cross_attn")(norm(name="ln_cross")(x), kv, kv_mask,
                                           train=train))
    x = x + drop(adapt("adapter_mlp", mlp(norm(name="ln2")(x), train=train)))
    return x if cache is None else (x, kv_out)


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
  peft: Peft = Peft()

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, *, kv: Array | None = None,
               kv_mask: Array | None = None, train: bool = False,
               cache: KVCache | None = None):
    """With `cache`, returns (x, cache with this call's keys/values written; its index
    is the caller's to advance, as only the caller knows which new tokens are real)."""
    keys, values = [], []
    for i in range(self.depth):
      rate = self.drop_path * i / max(self.depth - 1, 1)
      block_cache = None if cache is None else (cache.keys[i], cache.values[i], cache.index)
      x = Block(self.heads, self.mlp_dim, self.act, self.cross, self.dropout, rate,
                self.ln_eps, self.dtype, self.post_norm, self.peft, name=f"block_{i}")(
                    x, mask, kv=kv, kv_mask=kv_mask, train=train, cache=block_cache)
      if cache is not None:
        x, (k, v) = x
        keys.append(k)
        values.append(v)
    if self.final_norm:
      x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_final")(x)
    return x if cache is None else (x, cache.replace(keys=tuple(keys), values=tuple(values)))


def key_mask(mask: Array) -> Array:
  """[B, S] 0/1 validity -> boolean attention mask [B, 1, 1, S]."""
  return mask.astype(bool)[:, None, None, :]
