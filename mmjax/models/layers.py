"""Transformer building blocks shared by every tower: MLP, adapter, stochastic depth, the
pre-LN block and the Encoder stack (scanned, rematerialised); Dense layers are in dense.py,
attention and the KV cache in attention.py.

Shapes: B batch, L tokens, D width.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import Attention, KVCache
from mmjax.models.dense import DENSE_OUT, Dense, Peft, constrain

Array = jax.Array
Dtype = Any


def keeps_input(fn: Callable[[Array], Array], grad: Callable[[Array], Array]
                ) -> Callable[[Array], Array]:
  """The elementwise `fn` with a backward pass that keeps only its input x and recomputes
  the derivative grad(x) = fn'(x) from it (in float32 for narrower inputs). Autodiff of
  fn would also keep its intermediates (sigmoid(1.702 x), the erfc or tanh term): one or
  more [B, L, 4D] per block. Forward values are fn's own; being a custom VJP, it has no
  forward-mode (jvp) derivative, so no Hessian-vector products either."""
  @jax.custom_vjp
  def act(x):
    return fn(x)

  def act_bwd(x, dy):
    # The barrier stops XLA from merging (CSE) the recomputed sigmoid, erfc or tanh with
    # the forward's, which would keep it alive until here after all (unrolled stacks).
    x = jax.lax.optimization_barrier(x)
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return ((dy.astype(wide.dtype) * grad(wide)).astype(x.dtype),)

  act.defvjp(lambda x: (fn(x), x), act_bwd)
  return act


def _quick_gelu_grad(x: Array) -> Array:
  s = nn.sigmoid(1.702 * x)
  return s + 1.702 * x * s * (1.0 - s)


def _gelu_grad(x: Array) -> Array:
  """d/dx of x Phi(x): Phi(x) + x phi(x), with Phi written as nn.gelu writes it."""
  return 0.5 * jax.lax.erfc(-x * math.sqrt(0.5)) + x * jnp.exp(-0.5 * x * x) / math.sqrt(
      2 * math.pi)


def _gelu_tanh_grad(x: Array) -> Array:
  """With 0.5 (1 + tanh(u)) = sigmoid(2u): float32's 1 - tanh(u)^2 near |tanh| = 1 costs
  autodiff up to 9e-6 of error; this form stays within 2e-7 of the exact slope."""
  c, k = math.sqrt(2 / math.pi), 0.044715
  u = 2 * c * (x + k * x ** 3)
  s = nn.sigmoid(u)
  return s + x * s * nn.sigmoid(-u) * 2 * c * (1.0 + 3 * k * x * x)


# The activations' formulas, which autodiff would differentiate keeping intermediates.
FORMULAS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}
_SLOPES = {"gelu": _gelu_grad, "gelu_tanh": _gelu_tanh_grad, "quick_gelu": _quick_gelu_grad}
# relu stays as it is: its backward already keeps only a bool mask of its input.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    **{name: keeps_input(fn, _SLOPES[name]) for name, fn in FORMULAS.items()},
    "relu": nn.relu,
}


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
    x = ACTIVATIONS[self.act](constrain(x, -1))       # hidden units over `model`
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return Dense(d, dtype=self.dtype, name="fc2", **self.peft.lora("fc2"))(x)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example. `rate` may be a traced
  scalar: a scanned stack's per-layer rate (see Encoder)."""
  rate: float | Array

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if not train or (not isinstance(self.rate, jax.Array) and self.rate == 0.0):
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
               cache: tuple[Array, Array, Array] | None = None,
               cross_kv: tuple[Array, Array] | None = None, drop_rate: Array | None = None):
    """With `cache` (see Attention), returns (x, the self-attention's (keys, values), the
    cross-attention's (keys, values) or None). Cross-attention runs when there is
    something to attend to: `kv` tokens, or `cross_kv` projected by an earlier call (a
    cross block given neither, a decoder's text-only pass, skips it). `drop_rate` (a
    scanned stack's per-layer scalar) replaces the `drop_path` field."""
    norm = functools.partial(nn.LayerNorm, epsilon=self.ln_eps, dtype=self.dtype)
    attn = functools.partial(Attention, self.heads, self.dropout, self.dtype, self.peft)
    path_rate = self.drop_path if drop_rate is None else drop_rate
    drop = lambda y: nn.Dropout(self.dropout)(DropPath(path_rate)(y, train=train),
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
      return x if cache is None else (x, kv_out, None)
    y, kv_out = self_attn(norm(name="ln1")(x))
    x = x + drop(adapt("adapter_attn", y))
    cross_out = cross_kv
    if self.cross and (kv is not None or cross_kv is not None):
      cross = attn(name="cross_attn")
      y = norm(name="ln_cross")(x)
      if cross_kv is not None:
        y = cross(y, cross_kv, train=train)
      elif cache is not None:
        y, cross_out = cross(y, kv, kv_mask, train=train, return_kv=True)
      else:
        y = cross(y, kv, kv_mask, train=train)
      x = x + drop(y)
    x = x + drop(adapt("adapter_mlp", mlp(norm(name="ln2")(x), train=train)))
    return x if cache is None else (x, kv_out, cross_out)


class Encoder(nn.Module):
  """A stack of `depth` blocks (`block_0` ... at the bottom) and a final LayerNorm.

  Stochastic depth grows linearly from 0 at the bottom to `drop_path` at the top.
  `scan_layers=True` runs one Block, named `blocks`, under nn.scan: its params carry a
  leading [depth] axis and XLA compiles the block once instead of `depth` times
  (mmjax/io/layers_layout.py converts checkpoints between the two layouts). `remat`
  names what the backward pass keeps of each block's forward (REMAT_POLICIES); the rest
  is recomputed.
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
  scan_layers: bool = False
  remat: str = "none"        # "none" or a key of REMAT_POLICIES

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, *, kv: Array | None = None,
               kv_mask: Array | None = None, train: bool = False,
               cache: KVCache | None = None):
    """With `cache`, returns (x, cache with this call's keys/values written; its index
    is the caller's to advance, as only the caller knows which new tokens are real)."""
    block = functools.partial(Block, self.heads, self.mlp_dim, self.act, self.cross,
                              self.dropout)
    block_rest = (self.ln_eps, self.dtype, self.post_norm, self.peft)
    layer = self._layer_fn(train)
    if self.scan_layers:
      x, cache = self._scan(layer, block(self.drop_path, *block_rest, name="blocks"),
                            x, mask, kv, kv_mask, cache)
    else:
      keys, values, cross_keys, cross_values = [], [], [], []
      for i in range(self.depth):
        rate = self.drop_path * i / max(self.depth - 1, 1)
        block_cache = cross_kv = None
        if cache is not None:
          block_cache = (cache.keys[i], cache.values[i], cache.index)
          if cache.cross_keys:
            cross_kv = (cache.cross_keys[i], cache.cross_values[i])
        x = layer(block(rate, *block_rest, name=f"block_{i}"), x, mask, kv, kv_mask,
                  (block_cache, cross_kv, None))
        if cache is not None:
          x, (k, v), cross = x
          keys.append(k)
          values.append(v)
          if cross is not None:
            cross_keys.append(cross[0])
            cross_values.append(cross[1])
      if cache is not None:
        cache = cache.replace(keys=tuple(keys), values=tuple(values),
                              cross_keys=tuple(cross_keys), cross_values=tuple(cross_values))
    if self.final_norm:
      x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_final")(x)
    return x if cache is None else (x, cache)

  def _layer_fn(self, train: bool) -> Callable:
    """(block, x, mask, kv, kv_mask, (cache, cross_kv, drop_rate)) -> the block's output,
    rematerialised as `remat` says."""
    def layer(block, x, mask, kv, kv_mask, per_layer):
      cache, cross_kv, rate = per_layer
      return block(x, mask, kv=kv, kv_mask=kv_mask, train=train, cache=cache,
                   cross_kv=cross_kv, drop_rate=rate)
    if self.remat == "none":
      return layer
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: expected 'none' or one of "
                       f"{sorted(REMAT_POLICIES)}")
    # Inside a scan the recomputation cannot be merged with the forward pass anyway, so
    # the CSE barrier that prevent_cse adds would only cost (Flax's remat docs).
    return nn.remat(layer, policy=REMAT_POLICIES[self.remat],
                    prevent_cse=not self.scan_layers)

  def _scan(self, layer: Callable, block: Block, x: Array, mask, kv, kv_mask,
            cache: KVCache | None):
    """The blocks as one nn.scan; the cache's per-block tuples ride along as [depth, ...]
    stacks (KVCache keeps its per-block layout, batch on axis 0, for the decoders)."""
    rates = None
    if self.drop_path:
      rates = self.drop_path * jnp.arange(self.depth) / max(self.depth - 1, 1)
    index, per_layer = None, (None, None, None, rates)
    if cache is not None:
      cross = None
      if cache.cross_keys:
        cross = (jnp.stack(cache.cross_keys), jnp.stack(cache.cross_values))
      index = cache.index
      per_layer = (jnp.stack(cache.keys), jnp.stack(cache.values), cross, rates)

    def body(block, x, mask, kv, kv_mask, index, per_layer):
      keys, values, cross_kv, rate = per_layer
      block_cache = None if keys is None else (keys, values, index)
      out = layer(block, x, mask, kv, kv_mask, (block_cache, cross_kv, rate))
      return (out, None) if block_cache is None else (out[0], out[1:])

    # Each layer draws its own params at init and its own dropout / drop-path masks.
    scan = nn.scan(body, variable_axes={True: 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,) * 4 + (0,), length=self.depth)
    x, written = scan(block, x, mask, kv, kv_mask, index, per_layer)
    if cache is None:
      return x, None
    (keys, values), cross = written
    per_block = lambda a: tuple(a[i] for i in range(self.depth))
    cross_keys, cross_values = map(per_block, cross) if cross is not None else ((), ())
    return x, cache.replace(keys=per_block(keys), values=per_block(values),
                            cross_keys=cross_keys, cross_values=cross_values)


# model.remat: what the backward pass keeps of a block's forward ("none": everything,
# no remat; "full": only the block's input, the whole block is recomputed). The dots_*
# policies also keep the Dense products named DENSE_OUT: dense.py's custom VJP hides its
# dot_general from them (without the name, "dots_*" recomputed as much as "full").
_policies = jax.checkpoint_policies
_with_dense = lambda policy: _policies.save_from_both_policies(
    policy, _policies.save_only_these_names(DENSE_OUT))
REMAT_POLICIES: dict[str, Callable] = {
    "full": _policies.nothing_saveable,
    "dots_saveable": _with_dense(_policies.dots_saveable),
    "dots_with_no_batch_dims_saveable": _with_dense(_policies.dots_with_no_batch_dims_saveable),
    "checkpoint_dots": _with_dense(_policies.checkpoint_dots),
    "checkpoint_dots_with_no_batch_dims":
        _with_dense(_policies.checkpoint_dots_with_no_batch_dims),
    "everything_saveable": _policies.everything_saveable,
}
