"""Vision Transformer image tower."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.dense import Dense, Peft
from mmjax.models.layers import Encoder


def resample_posemb(posemb: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """[1, h*w, D] learned position embeddings -> [1, grid[0]*grid[1], D], bilinear.

  The stored grid is taken as square (it is, for every model mmjax builds).
  """
  n, d = posemb.shape[1], posemb.shape[2]
  side = int(round(np.sqrt(n)))
  if side * side != n:
    raise ValueError(f"position embedding of {n} tokens is not a square grid")
  if (side, side) == tuple(grid):
    return posemb
  image = posemb.reshape(1, side, side, d)
  image = jax.image.resize(image, (1, *grid, d), method="bilinear")
  return image.reshape(1, grid[0] * grid[1], d)


class ViT(nn.Module):
  """Conv patch embedding + learned position embeddings + pre-LN encoder.

  Returns {"tokens": [B, N(+1), D], "pooled": [B, D]} (+ "logits" [B, C] with
  `num_classes`). `image_size` fixes the stored position grid; other input
  resolutions resample it on the fly.
  """
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int
  image_size: int = 224
  pool: str = "cls"          # "cls" | "gap"
  act: str = "gelu"
  pre_norm: bool = False     # LayerNorm on the embeddings (CLIP's vision tower has one)
  ln_eps: float = 1e-6
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  # Options that express Hugging Face ViT and CLIP vision towers:
  patch_bias: bool = True    # CLIP's patch embedding has no bias
  posemb_cls: bool = False   # the position embedding covers the cls token too: [1, 1+N, D]
  final_norm: str = "tokens"  # LayerNorm on every output token, or on the "pooled" one (CLIP)
  pooler: bool = False       # tanh(Dense(pooled)), HF ViTModel's pooler
  num_classes: int = 0       # > 0: a linear classifier "head" on the pooled token
  peft: Peft = Peft()        # LoRA / adapters in every block
  scan_layers: bool = False  # the blocks as one nn.scan (see Encoder)
  remat: str = "none"        # what backprop keeps of each block (see Encoder)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
    x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", use_bias=self.patch_bias, dtype=self.dtype,
                name="patch_embed")(images)
    b, gh, gw, d = x.shape                                   # [B, gh, gw, D]
    x = x.reshape(b, gh * gw, d)
    side = self.image_size // self.patch
    n_cls = int(self.posemb_cls and self.pool == "cls")
    posemb = self.param("posemb", nn.initializers.normal(0.02), (1, n_cls + side * side, d))
    x = x + resample_posemb(posemb[:, n_cls:], (gh, gw)).astype(x.dtype)
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
      if n_cls:
        cls = cls + posemb[:, :1]
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
    if self.pre_norm:
      x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_pre")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = Encoder(self.depth, self.heads, self.mlp_dim, self.act, dropout=self.dropout,
                drop_path=self.drop_path, ln_eps=self.ln_eps,
                final_norm=self.final_norm == "tokens", dtype=self.dtype, peft=self.peft,
                scan_layers=self.scan_layers, remat=self.remat, name="encoder")(x, train=train)
    if self.pool == "cls":
      pooled = x[:, 0]
    elif self.pool == "gap":
      pooled = x.mean(axis=1)
    else:
      raise ValueError(f"unknown ViT pool {self.pool!r}; expected 'cls' or 'gap'")
    if self.final_norm == "pooled":
      pooled = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_post")(pooled)
    if self.pooler:
      pooled = jnp.tanh(Dense(d, dtype=self.dtype, name="pooler")(pooled))
    out = {"tokens": x, "pooled": pooled}
    if self.num_classes:
      out["logits"] = Dense(self.num_classes, dtype=self.dtype, name="head")(pooled).astype(
          jnp.float32)
    return out
