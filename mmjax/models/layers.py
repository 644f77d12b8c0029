"""Building blocks shared by every tower: Dense, attention, MLP, pre-LN block.

Shapes: B batch, L query tokens, S key tokens, D width, H heads, K head dim.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
Dtype = Any

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "relu": nn.relu,
}


# The name of a Dense layer's product, which the dots_* remat policies keep
# (REMAT_POLICIES).
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


def _dense_matmul(x: Array, w: Any, dtype: Dtype) -> Array:
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
    y = _dense_matmul(x, kernel, self.dtype)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.lora_rank:
      # A as torch's Linear default (uniform, bound 1/sqrt(I)); B = 0: no change at init.
      a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
      a = self.param("lora_a", a_init, (x.shape[-1], self.lora_rank), self.param_dtype)
      b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, self.features),
                     self.param_dtype)
      low = _dense_matmul(x, a, self.dtype)                                  # [..., r]
      y = y + (self.lora_alpha / self.lora_rank) * _dense_matmul(low, b, self.dtype)
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
    elif kv is x and cache is None and not _PLAIN.get() and not any(
        self.peft.lora(n)["lora_rank"] for n in names) and not tensor_parallel():
      # Self-attention: q, k, v as one GEMM over the concatenated kernels, same
      # params as three Dense layers (-7% train step time on CPU, BENCHMARKS.md).
      # Not under tensor parallelism: concatenating head-split kernels moves them.
      # Not with a cache (decoding): a step multiplies one token by each kernel, so
      # fusing gains nothing, and every decode call paid for a concatenated copy of the
      # kernels (BENCHMARKS.md, "decode, batch 1 (second look)").
      kernels, biases = zip(*(DenseParams(d, name=n)(d) for n in names))
      qkv = checkpoint_name(_matmul(x.astype(self.dtype),
                                    jnp.concatenate(kernels, 1).astype(self.dtype)), DENSE_OUT)
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
# policies also keep the Dense products named DENSE_OUT: _matmul's custom VJP hides its
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


def key_mask(mask: Array) -> Array:
  """[B, S] 0/1 validity -> boolean attention mask [B, 1, 1, S]."""
  return mask.astype(bool)[:, None, None, :]
