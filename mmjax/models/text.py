"""Text tower: a bidirectional encoder, or causal when `causal=True`."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.heads import MlmHead
from mmjax.models.layers import Dense, Encoder, KVCache, Peft, key_mask


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

  Decoding (causal towers): pass `cache` (from `empty_cache`) and the call appends
  `ids` (right-padded, [B, L]) to each row after the tokens the cache holds, attends
  to those, and returns the advanced cache as out["cache"]. A prompt prefilled in one
  call and then one token per call gives the outputs of one call on the whole text.
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

  def empty_cache(self, batch: int, length: int) -> KVCache:
    """A KV cache of `length` slots (prompt + new tokens, at most max_len) per row."""
    if not self.causal:
      raise ValueError("only a causal text tower decodes with a KV cache")
    if length > self.max_len:
      raise ValueError(f"a cache of {length} tokens exceeds this tower's {self.max_len}")
    return KVCache.empty(batch, length, self.depth, self.heads, self.width // self.heads,
                         self.dtype)

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array, *, type_ids: jax.Array | None = None,
               train: bool = False, cache: KVCache | None = None):
    b, length = ids.shape
    if length > self.max_len:
      raise ValueError(f"text has {length} tokens; this tower takes at most {self.max_len}")
    posemb = self.param("posemb", nn.initializers.normal(0.01), (1, self.max_len, self.width))
    embed = nn.Embed(self.vocab_size, self.width,
                     embedding_init=nn.initializers.normal(0.02), name="token_embed")
    if cache is None:
      pos = posemb[:, :length]
    else:   # the caller keeps index + length <= cache.length <= max_len
      pos = jnp.take(posemb[0], cache.positions(length), axis=0)             # [B, L, D]
    x = embed(ids).astype(self.dtype) + pos.astype(self.dtype)
    if self.type_vocab:
      types = jnp.zeros_like(ids) if type_ids is None else type_ids
      x = x + nn.Embed(self.type_vocab, self.width, embedding_init=nn.initializers.normal(0.02),
                       name="type_embed")(types).astype(self.dtype)
    if self.embed_norm:
      x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_embed")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    encoder = Encoder(self.depth, self.heads, self.mlp_dim, self.act, dropout=self.dropout,
                      drop_path=self.drop_path, ln_eps=self.ln_eps,
                      final_norm=not self.post_norm, dtype=self.dtype,
                      post_norm=self.post_norm, peft=self.peft, name="encoder")
    if cache is None:
      attn_mask = key_mask(mask)
      if self.causal:
        attn_mask = attn_mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
      x = encoder(x, attn_mask, train=train)
    else:
      if not self.causal:
        raise ValueError("only a causal text tower decodes with a KV cache")
      # Slots before the index are all real (it counts real tokens only) and a row's
      # padding follows its real tokens, so causality alone hides every pad and stale slot.
      x, cache = encoder(x, cache.causal_mask(length), train=train, cache=cache)
      cache = cache.replace(index=cache.index + mask.sum(axis=1).astype(jnp.int32))
    pooled = pool_tokens(x, mask, self.pool)
    if self.pooler:
      pooled = jnp.tanh(Dense(self.width, dtype=self.dtype, name="pooler")(pooled))
    out = {"tokens": x, "pooled": pooled}
    if cache is not None:
      out["cache"] = cache
    if self.head == "lm":
      out["logits"] = embed.attend(x).astype(jnp.float32)
    elif self.head == "mlm":
      out["logits"] = MlmHead(self.vocab_size, self.act, self.ln_eps, self.dtype,
                              name="mlm_head")(x, embed)
    elif self.head:
      raise ValueError(f"unknown text head {self.head!r}; expected '', 'lm' or 'mlm'")
    return out
