"""Fusion Transformer over text and image tokens.

Two modes:
  * "merged": self-attention over [text; image] tokens, each with a learned
    modality embedding (ViLT / single-stream style).
  * "cross": text queries self-attend, then cross-attend into image tokens
    (ALBEF / BLIP style); image tokens are not updated.
Either way the output is the fused text tokens [B, L, D]; token 0 (the text
[CLS]) summarises the pair for ITM-like heads.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import key_mask
from mmjax.models.dense import Dense, Peft
from mmjax.models.layers import Encoder


class Fusion(nn.Module):
  mode: str
  width: int
  depth: int
  heads: int
  mlp_dim: int
  act: str = "gelu"
  ln_eps: float = 1e-6
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  peft: Peft = Peft()
  scan_layers: bool = False  # the blocks as one nn.scan (see Encoder)
  remat: str = "none"        # what backprop keeps of each block (see Encoder)

  @nn.compact
  def __call__(self, text: jax.Array, text_mask: jax.Array, image: jax.Array, *,
               train: bool = False) -> jax.Array:
    """text [B, L, Dt], text_mask [B, L], image [B, N, Di] -> [B, L, D]."""
    if text.shape[-1] != self.width:
      text = Dense(self.width, dtype=self.dtype, name="text_in")(text)
    if image.shape[-1] != self.width:
      image = Dense(self.width, dtype=self.dtype, name="image_in")(image)
    encoder = Encoder(self.depth, self.heads, self.mlp_dim, self.act,
                      cross=self.mode == "cross", dropout=self.dropout,
                      drop_path=self.drop_path, ln_eps=self.ln_eps, dtype=self.dtype,
                      peft=self.peft, scan_layers=self.scan_layers, remat=self.remat,
                      name="encoder")
    image_mask = jnp.ones(image.shape[:2], text_mask.dtype)
    if self.mode == "merged":
      modality = self.param("modality_embed", nn.initializers.normal(0.02), (2, self.width))
      x = jnp.concatenate([text + modality[0].astype(text.dtype),
                           image + modality[1].astype(image.dtype)], axis=1)
      mask = jnp.concatenate([text_mask, image_mask], axis=1)
      return encoder(x, key_mask(mask), train=train)[:, :text.shape[1]]
    if self.mode == "cross":
      return encoder(text, key_mask(text_mask), kv=image, kv_mask=key_mask(image_mask),
                     train=train)
    raise ValueError(f"unknown fusion mode {self.mode!r}; expected 'merged' or 'cross'")
