"""Text tower: a bidirectional encoder, or causal when `causal=True`."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.heads import MlmHead
from mmjax.models.layers import Dense, Encoder, Peft, key_mask


def pool_tokens(x: jax.Array, mask: jax.Array, how: str) -> jax.Array:
  """[B, L, D] tokens, [B, L] 0/1 mask -> [B, D]."""
  if how == "cls":
    return x[:, 0]
  if how == "eos":  # the last real token (CLIP's EOT when text is right-padded)
    last = jnp.maximum(mask.sum(axis=1) - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
  if how == "mean":
    m = mask[..., None].astype(x.dtype)
    return (x * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1)
  raise ValueError(f"unknown text pool {how!r}; expected 'cls', 'eos' or 'mean'")


class TextEncoder(nn.Module):
  """Token + learned position embeddings, pre-LN blocks, final LayerNorm.

  Returns {"tokens": [B, L, D], "pooled": [B, D]} (+ "logits" [B, L, V] with a
  `head`). Padding (mask == 0) is never attended to, so real tokens' outputs do
  not depend on how much padding follows.
  """
  vocab_size: int
  max_len: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  pool: str = "cls"          # "cls" | "eos" | "mean"
  causal: bool = False
  act: str = "gelu"
  ln_eps: float = 1e-6
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  # Options that express BERT-family encoders and GPT-2:
  type_vocab: int = 0        # > 0: token-type (segment) embeddings, added to the input
  embed_norm: bool = False   # LayerNorm on the summed embeddings
  post_norm: bool = False    # post-LN blocks and no final LayerNorm (BERT)
  pooler: bool = False       # tanh(Dense(pooled)), BERT's pooler
  head: str = ""             # "lm": logits tied to token_embed (GPT-2); "mlm": BERT's MLM head
  peft: Peft = Peft()        # LoRA / adapters in every block

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array, *, type_ids: jax.Array | None = None,
               train: bool = False):
    b, length = ids.shape
    if length > self.max_len:
      raise ValueError(f"text has {length} tokens; this tower takes at most {self.max_len}")
    posemb = self.param("posemb", nn.initializers.normal(0.01), (1, self.max_len, self.width))
    embed = nn.Embed(self.vocab_size, self.width,
                     embedding_init=nn.initializers.normal(0.02), name="token_embed")
    x = embed(ids).astype(self.dtype) + posemb[:, :length].astype(self.dtype)
    if self.type_vocab:
      types = jnp.zeros_like(ids) if type_ids is None else type_ids
      x = x + nn.Embed(self.type_vocab, self.width, embedding_init=nn.initializers.normal(0.02),
                       name="type_embed")(types).astype(self.dtype)
    if self.embed_norm:
      x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_embed")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    attn_mask = key_mask(mask)
    if self.causal:
      attn_mask = attn_mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
    x = Encoder(self.depth, self.heads, self.mlp_dim, self.act, dropout=self.dropout,
                drop_path=self.drop_path, ln_eps=self.ln_eps, final_norm=not self.post_norm,
                dtype=self.dtype, post_norm=self.post_norm, peft=self.peft, name="encoder")(
                    x, attn_mask, train=train)
    pooled = pool_tokens(x, mask, self.pool)
    if self.pooler:
      pooled = jnp.tanh(Dense(self.width, dtype=self.dtype, name="pooler")(pooled))
    out = {"tokens": x, "pooled": pooled}
    if self.head == "lm":
      out["logits"] = embed.attend(x).astype(jnp.float32)
    elif self.head == "mlm":
      out["logits"] = MlmHead(self.vocab_size, self.act, self.ln_eps, self.dtype,
                              name="mlm_head")(x, embed)
    elif self.head:
      raise ValueError(f"unknown text head {self.head!r}; expected '', 'lm' or 'mlm'")
    return out
