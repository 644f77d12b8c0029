"""Text tower: a bidirectional encoder, or causal when `causal=True` (a decoder: with an
LM head, cross-attention into image tokens and a bidirectional prefix as options)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import KVCache, key_mask
from mmjax.models.dense import Dense, Peft
from mmjax.models.heads import MlmHead
from mmjax.models.layers import Encoder


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
  `logits_at` [B] (a prefill's last real tokens): the head runs at that one position of
  each row, "logits" [B, V] instead of [B, L, V] ("tokens" stays [B, L, D]).

  Decoder options: `cross=True` adds cross-attention to every block, into `kv` [B, M, D']
  (image tokens) when the call passes them; with a cache, the call that passes them
  projects their keys/values into the cache once and later calls read them there.
  `prefix_len` [B] (prefix-LM, PaliGemma style): each row's first prefix_len tokens
  attend to each other both ways, the rest causally; with a cache, the prefix must
  arrive in one call. `tie_embed=False` gives the LM head its own output matrix.

  `image_prefix=M` (PaliGemma style, instead of cross-attention): the call that passes
  `kv` [B, M, D'] runs on [Dense(kv) (to the text width); the text], the M image tokens
  and the text's first prefix_len tokens attending to each other both ways, the rest of
  the text causally. The outputs are the text's alone (tokens, logits [B, L, ...]): image
  positions predict nothing, so no loss can fall on them. Positions: the image tokens
  carry the image tower's own position embeddings and take none of the text's; the text
  keeps its learned table from position 0, so a text token's position does not depend on
  the image resolution, max_len counts text tokens only, and a text-only call (kv None,
  as a CoCa text pass) sees the positions it would after an image. With a cache, the
  image tokens fill its first M slots (`empty_cache` adds them): the first call must
  pass `kv`, and it holds the whole bidirectional prefix (image + prompt).
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
  head: str = ""             # "lm": next-token logits (GPT-2); "mlm": BERT's MLM head
  peft: Peft = Peft()        # LoRA / adapters in every block
  scan_layers: bool = False  # the blocks as one nn.scan (see Encoder)
  remat: str = "none"        # what backprop keeps of each block (see Encoder)
  cross: bool = False        # cross-attention into `kv` in every block (CoCa / BLIP decoder)
  tie_embed: bool = True     # the "lm" head is token_embed's transpose; False: its own
  image_prefix: int = 0      # > 0: that many image tokens (`kv`) precede the text

  @property
  def reads_images(self) -> bool:
    """Whether the tower takes image tokens (`kv`): cross-attention or an image prefix."""
    return self.cross or self.image_prefix > 0

  def empty_cache(self, batch: int, length: int) -> KVCache:
    """A KV cache for `length` text tokens (prompt + new tokens, at most max_len) per row,
    after the image prefix's slots when the tower has one."""
    if not self.causal:
      raise ValueError("only a causal text tower decodes with a KV cache")
    if length > self.max_len:
      raise ValueError(f"a cache of {length} tokens exceeds this tower's {self.max_len}")
    return KVCache.empty(batch, self.image_prefix + length, self.depth, self.heads,
                         self.width // self.heads, self.dtype)

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array, *, type_ids: jax.Array | None = None,
               train: bool = False, cache: KVCache | None = None,
               kv: jax.Array | None = None, prefix_len: jax.Array | None = None,
               logits_at: jax.Array | None = None):
    b, length = ids.shape
    if length > self.max_len:
      raise ValueError(f"text has {length} tokens; this tower takes at most {self.max_len}")
    posemb = self.param("posemb", nn.initializers.normal(0.01), (1, self.max_len, self.width))
    embed = nn.Embed(self.vocab_size, self.width,
                     embedding_init=nn.initializers.normal(0.02), name="token_embed")
    if kv is not None and not self.reads_images:
      raise ValueError("image tokens given to a text tower without cross-attention or an "
                       "image prefix")
    prepend = self.image_prefix > 0 and kv is not None
    if prepend and kv.shape[1] != self.image_prefix:
      raise ValueError(f"{kv.shape[1]} image tokens {kv.shape}; this decoder's image prefix "
                       f"holds {self.image_prefix} (the image tower at data.image_size)")
    if cache is None:
      pos = posemb[:, :length]
    else:   # the caller keeps index + length <= cache.length <= image_prefix + max_len
      # Text positions count text tokens only: slot s holds position s - image_prefix (the
      # call that prepends the image starts at slot 0, its text at slot image_prefix).
      first = cache.index if prepend else cache.index - self.image_prefix     # [B]
      pos = jnp.take(posemb[0], first[:, None] + jnp.arange(length), axis=0)  # [B, L, D]
    x = embed(ids).astype(self.dtype) + pos.astype(self.dtype)
    if self.type_vocab:
      types = jnp.zeros_like(ids) if type_ids is None else type_ids
      x = x + nn.Embed(self.type_vocab, self.width, embedding_init=nn.initializers.normal(0.02),
                       name="type_embed")(types).astype(self.dtype)
    if self.embed_norm:
      x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_embed")(x)
    text_mask, m = mask, 0
    if prepend:     # [image tokens; text]: one sequence, the image a prefix of every row
      m = self.image_prefix
      image = Dense(self.width, dtype=self.dtype, name="image_in")(kv)        # [B, M, D]
      x = jnp.concatenate([image.astype(self.dtype), x], axis=1)              # [B, M + L, D]
      mask = jnp.concatenate([jnp.ones((b, m), mask.dtype), mask], axis=1)
      prefix_len = m + (jnp.zeros((b,), jnp.int32) if prefix_len is None else prefix_len)
      kv = kv if self.cross else None          # read as the prefix, not cross-attended
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    encoder = Encoder(self.depth, self.heads, self.mlp_dim, self.act, dropout=self.dropout,
                      drop_path=self.drop_path, ln_eps=self.ln_eps,
                      final_norm=not self.post_norm, dtype=self.dtype,
                      post_norm=self.post_norm, peft=self.peft, cross=self.cross,
                      scan_layers=self.scan_layers, remat=self.remat, name="encoder")
    n = m + length
    if cache is None:
      attn_mask = key_mask(mask)
      if self.causal:
        seen = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if prefix_len is not None:
          seen = seen | (jnp.arange(n) < prefix_len[:, None])[:, None, None]
        attn_mask = attn_mask & seen
      x = encoder(x, attn_mask, kv=kv, train=train)
    else:
      if not self.causal:
        raise ValueError("only a causal text tower decodes with a KV cache")
      # Slots before the index are all real (it counts real tokens only) and a row's
      # padding follows its real tokens, so causality alone hides every pad and stale slot.
      attn_mask = cache.causal_mask(n)
      if prefix_len is not None:   # this call's tokens are (or start) the prefix
        attn_mask = attn_mask | (jnp.arange(cache.length) < prefix_len[:, None])[:, None, None]
      x, cache = encoder(x, attn_mask, kv=kv, train=train, cache=cache)
      cache = cache.replace(index=cache.index + mask.sum(axis=1).astype(jnp.int32))
    x, mask = x[:, m:], text_mask                   # outputs at the text positions only
    pooled = pool_tokens(x, mask, self.pool)
    if self.pooler:
      pooled = jnp.tanh(Dense(self.width, dtype=self.dtype, name="pooler")(pooled))
    out = {"tokens": x, "pooled": pooled}
    if cache is not None:
      out["cache"] = cache
    if logits_at is not None:   # the head on [B, D]: a [B, L, V] product would go unread
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
    if self.head == "lm" and self.tie_embed:
      out["logits"] = embed.attend(x).astype(jnp.float32)
    elif self.head == "lm":
      out["logits"] = Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                            name="lm_head")(x).astype(jnp.float32)
    elif self.head == "mlm":
      out["logits"] = MlmHead(self.vocab_size, self.act, self.ln_eps, self.dtype,
                              name="mlm_head")(x, embed)
    elif self.head:
      raise ValueError(f"unknown text head {self.head!r}; expected '', 'lm' or 'mlm'")
    return out
