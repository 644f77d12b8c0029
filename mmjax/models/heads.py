"""Task heads on top of the towers."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.dense import Dense
from mmjax.models.layers import ACTIVATIONS


class MlmHead(nn.Module):
  """BERT-style prediction head: Dense -> act -> LayerNorm -> vocabulary logits.

  Given the tower's token `embed`, the decoder is tied to it (BERT): logits are
  `embed.attend(x) + bias` instead of a separate Dense "decoder".
  """
  vocab_size: int
  act: str = "gelu"
  ln_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, embed: nn.Embed | None = None) -> jax.Array:
    x = Dense(x.shape[-1], dtype=self.dtype, name="transform")(x)
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln")(ACTIVATIONS[self.act](x))
    if embed is None:
      return Dense(self.vocab_size, dtype=self.dtype, name="decoder")(x).astype(jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.vocab_size,))
    return (embed.attend(x) + bias).astype(jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
