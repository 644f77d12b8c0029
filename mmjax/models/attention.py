"""Multi-head attention, its padding mask, and the KV cache that decoding appends to.

Shapes: B batch, L query tokens, S key tokens, T cache slots, D width, H heads, K head dim.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mmjax.models.dense import (Dense, DenseParams, Peft, constrain, dense_matmul,
                                matmuls_are_plain, tensor_parallel)

Array = jax.Array
Dtype = Any


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
  # A decoder's cross-attention keys/values of the image tokens, per block [B, M, H, K]:
  # projected once by the call that passes the image tokens (the prefill), then read.
  cross_keys: tuple[Array, ...] = ()
  cross_values: tuple[Array, ...] = ()

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


def key_mask(mask: Array) -> Array:
  """[B, S] 0/1 validity -> boolean attention mask [B, 1, 1, S]."""
  return mask.astype(bool)[:, None, None, :]


class Attention(nn.Module):
  """Multi-head attention; queries from `x`, keys/values from `kv` (self if None).

  `mask` is boolean, broadcastable to [B, H, L, S]; True = may attend.
  Logits and softmax run in float32 whatever the compute dtype.
  With `cache` = (keys, values [B, T, H, K], start [B]) (self-attention only), the new
  keys/values are written at slots start .. start+L-1, attention reads all T slots
  (`mask` [B, 1, L, T] says which), and the call returns (y, (keys, values)).
  `kv` may also be (keys, values) [B, S, H, K] that an earlier call projected (a decoder's
  cached cross-attention); `return_kv=True` returns (y, (keys, values)) to cache them.
  """
  heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  peft: Peft = Peft()

  @nn.compact
  def __call__(self, x: Array, kv: Array | tuple[Array, Array] | None = None,
               mask: Array | None = None, *, train: bool = False,
               cache: tuple[Array, Array, Array] | None = None, return_kv: bool = False):
    if cache is not None and kv is not None:
      raise ValueError("a KV cache is for self-attention only")
    projected = kv if isinstance(kv, tuple) else None
    kv = x if kv is None or projected is not None else kv
    d = x.shape[-1]
    if d % self.heads:
      raise ValueError(f"width {d} is not divisible by heads={self.heads}")
    k_dim = d // self.heads
    dense = lambda name: Dense(d, dtype=self.dtype, name=name, **self.peft.lora(name))
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, k_dim)
    names = ("query", "key", "value")
    if projected is not None:
      q, (k, v) = split(dense("query")(x)), projected
    elif kv is x and cache is None and not matmuls_are_plain() and not any(
        self.peft.lora(n)["lora_rank"] for n in names) and not tensor_parallel():
      # Self-attention: q, k, v as one GEMM over the concatenated kernels, same
      # params as three Dense layers (-7% train step time on CPU, BENCHMARKS.md).
      # Not under tensor parallelism: concatenating head-split kernels moves them.
      # Not with a cache (decoding): a step multiplies one token by each kernel, so
      # fusing gains nothing, and every decode call paid for a concatenated copy of the
      # kernels (BENCHMARKS.md, "decode, batch 1 (second look)").
      kernels, biases = zip(*(DenseParams(d, name=n)(d) for n in names))
      qkv = dense_matmul(x, jnp.concatenate(kernels, 1), self.dtype)
      q, k, v = map(split, jnp.split(qkv + jnp.concatenate(biases).astype(self.dtype), 3, -1))
    else:
      q = split(dense("query")(x))   # [B, L, H, K]
      k = split(dense("key")(kv))    # [B, S, H, K]
      v = split(dense("value")(kv))  # [B, S, H, K]
    q, k, v = (constrain(t, -2) for t in (q, k, v))     # heads over `model`
    if cache is not None:
      keys, values, start = cache
      k, v = write_rows(keys, k, start), write_rows(values, v, start)   # [B, T, H, K]
    logits = jnp.einsum("blhk,bshk->bhls", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(k_dim).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout)(weights, deterministic=not train)
    out = constrain(jnp.einsum("bhls,bshk->blhk", weights, v), -2)
    y = dense("out")(out.reshape(*x.shape[:-1], d))
    return y if cache is None and not return_kv else (y, (k, v))
