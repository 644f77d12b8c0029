"""ResNet v1.5 image tower: basic or bottleneck blocks, BatchNorm or GroupNorm.

The layout of Hugging Face's ResNetModel, so that its checkpoints map one tensor to
one param: a 7x7/2 conv stem + norm + ReLU + 3x3/2 max-pool, then stages of residual
blocks whose first block (in every stage but the first) strides by 2 on its 3x3 conv
(v1.5; v1 strides on the bottleneck's first 1x1). Every conv pads k // 2 on each
side, as torch's `padding=k // 2`; "SAME" would pad a stride-2 conv unevenly.

Blocks are numbered across stages: ResNet-18's "stage_1/block_2" is the network's
third block (stage 1's first), so block_i is layer i + 1 for the fine-tuning
strategies, as in a Transformer tower.

BatchNorm keeps its running statistics in the "batch_stats" collection: `train=True`
normalises with the batch's statistics (under jit with the batch sharded over the
mesh, those are the global batch's) and updates them when the caller applies with
`mutable=["batch_stats"]`; `train=False` uses them.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.dense import Dense

BN_MOMENTUM = 0.9    # torch's momentum=0.1: running = 0.9 * running + 0.1 * batch
NORM_EPS = 1e-5


def conv_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """He init for ReLU networks, as torch's ResNets (kaiming_normal_, mode="fan_out"):
  N(0, 2 / (kh * kw * out)) for a [kh, kw, in, out] kernel. Drawn flat and reshaped:
  XLA:CPU compiles a 4-D random draw ~7x slower (a ResNet-18's init: 31 s vs 4 s)."""
  fan_out = shape[-1] * math.prod(shape[:-2])
  noise = jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)
  return math.sqrt(2.0 / fan_out) * noise


class ConvNorm(nn.Module):
  """Conv (no bias, padding k // 2) -> BatchNorm or GroupNorm (-> ReLU)."""
  features: int
  kernel: int
  stride: int = 1
  relu: bool = True
  norm: str = "batch"          # "batch" | "group"
  groups: int = 32             # GroupNorm's groups
  zero_scale: bool = False     # the norm's scale starts at 0 (a block's last: identity at init)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    p = self.kernel // 2
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                padding=((p, p), (p, p)), use_bias=False, kernel_init=conv_init,
                dtype=self.dtype, name="conv")(x)
    scale_init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
    if self.norm == "batch":
      x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=NORM_EPS,
                       scale_init=scale_init, dtype=self.dtype, name="norm")(x)
    else:
      x = nn.GroupNorm(num_groups=self.groups, epsilon=NORM_EPS, scale_init=scale_init,
                       dtype=self.dtype, name="norm")(x)
    return nn.relu(x) if self.relu else x


class Block(nn.Module):
  """Residual block: basic (3x3, 3x3) or bottleneck (1x1 to features / 4, 3x3 with the
  stride, 1x1 back to features); a 1x1 conv + norm shortcut where the shape changes."""
  features: int                # output channels
  stride: int = 1
  bottleneck: bool = True
  norm: str = "batch"
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(ConvNorm, norm=self.norm, groups=self.groups, dtype=self.dtype)
    if self.bottleneck:
      mid = self.features // 4
      y = conv(mid, 1, name="conv1")(x, train)
      y = conv(mid, 3, self.stride, name="conv2")(y, train)
      y = conv(self.features, 1, relu=False, zero_scale=True, name="conv3")(y, train)
    else:
      y = conv(self.features, 3, self.stride, name="conv1")(x, train)
      y = conv(self.features, 3, relu=False, zero_scale=True, name="conv2")(y, train)
    if x.shape[-1] != self.features or self.stride != 1:
      x = conv(self.features, 1, self.stride, relu=False, name="shortcut")(x, train)
    return nn.relu(x + y)


class Stage(nn.Module):
  """`depth` blocks at one resolution, named block_<first> ... (numbered network-wide)."""
  depth: int
  features: int
  stride: int
  first: int
  bottleneck: bool = True
  norm: str = "batch"
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for j in range(self.depth):
      x = Block(self.features, self.stride if j == 0 else 1, self.bottleneck, self.norm,
                self.groups, self.dtype, name=f"block_{self.first + j}")(x, train)
    return x


class ResNet(nn.Module):
  """Returns {"tokens": [B, h*w, C] (the last feature map, flattened), "pooled": [B, C]
  (its global average)} (+ "logits" [B, num_classes] with `num_classes`)."""
  depths: tuple[int, ...]
  widths: tuple[int, ...]      # output channels of each stage
  bottleneck: bool = True
  stem_width: int = 64
  norm: str = "batch"          # "batch" | "group"
  groups: int = 32
  num_classes: int = 0         # > 0: a linear classifier "head" on the pooled features
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
    norm = dict(norm=self.norm, groups=self.groups, dtype=self.dtype)
    x = ConvNorm(self.stem_width, 7, 2, name="stem", **norm)(images, train)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))   # pads with -inf
    first = 0
    for s, (depth, width) in enumerate(zip(self.depths, self.widths)):
      x = Stage(depth, width, 1 if s == 0 else 2, first, self.bottleneck, **norm,
                name=f"stage_{s}")(x, train)
      first += depth
    b, h, w, c = x.shape
    out = {"tokens": x.reshape(b, h * w, c), "pooled": x.mean(axis=(1, 2))}
    if self.num_classes:
      out["logits"] = Dense(self.num_classes, dtype=self.dtype, name="head")(
          out["pooled"]).astype(jnp.float32)
    return out
