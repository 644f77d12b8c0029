"""The one composite model: image tower, text tower, fusion and heads.

Which parts exist is decided by `registry.build_model` from the config; the
forward pass computes what the configured objectives read:

  image_emb, text_emb  [B, E]  unit-norm joint-space embeddings
  logit_scale, logit_bias      scalars (temperature, SigLIP bias)
  itm_logits [3B, 2], itm_labels [3B]       positives + hard negatives both ways
  mlm_logits [B, L, V], mlm_targets, mlm_weights [B, L]
  class_logits [B, C]   a linear classifier on the image tower's pooled token, the
                        text tower's, or the fusion tower's first (text [CLS]) token
  token_logits [B, L, C]  the classifier on every text-tower token ("text_tokens": NER)
  caption_logits [B, L, V], caption_targets, caption_weights [B, L]
                        a decoder (causal text tower, LM head) on the text, cross-attending
                        to the image tokens when it has cross-attention, after them when
                        they are its prefix (image_prefix); text position t predicts
                        token t + 1, weighted on real tokens after the prefix
  lm_logits, lm_targets, lm_weights       the same on the text alone (causal LM)
Towers that are not configured are not run: a classifier may be image-only.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.dense import Dense
from mmjax.models.heads import MlmHead, l2_normalize


def hard_negatives(sim: jax.Array, same: jax.Array, rng: jax.Array) -> jax.Array:
  """For each row i, sample j ~ softmax(sim[i]) among columns that are not a positive.

  sim [B, B] similarities; same [B, B] True where column j is a positive of row i
  (its own pair, or a pair with identical text). A row with no negative at all
  (a batch of one repeated caption) falls back to a uniform draw.
  """
  logits = jnp.where(same, -jnp.inf, jax.lax.stop_gradient(sim).astype(jnp.float32))
  none_left = jnp.all(same, axis=1, keepdims=True)
  logits = jnp.where(none_left, 0.0, logits)
  return jax.random.categorical(rng, logits, axis=1)


def mask_tokens(ids: jax.Array, mask: jax.Array, rng: jax.Array, *, prob: float,
                mask_id: int, vocab_size: int, special_ids: tuple[int, ...]):
  """BERT masking: pick `prob` of the real, non-special tokens; 80% -> [MASK],
  10% -> a random token, 10% unchanged. Returns (masked ids, picked 0/1 weights)."""
  r_pick, r_kind, r_tok = jax.random.split(rng, 3)
  maskable = mask.astype(bool)
  for s in special_ids:
    maskable &= ids != s
  picked = maskable & jax.random.bernoulli(r_pick, prob, ids.shape)
  kind = jax.random.uniform(r_kind, ids.shape)
  random_ids = jax.random.randint(r_tok, ids.shape, 0, vocab_size, ids.dtype)
  new = jnp.where(kind < 0.8, mask_id, jnp.where(kind < 0.9, random_ids, ids))
  return jnp.where(picked, new, ids), picked.astype(jnp.float32)


def in_slices(tower: nn.Module, n: int, *inputs: jax.Array, train: bool) -> dict[str, jax.Array]:
  """tower(*inputs) run on `n` independent slices of the batch, concatenated.

  Same maths; on a CPU with few cores XLA overlaps the slices' kernels, which
  its per-op threading alone does not fill (BENCHMARKS.md)."""
  n = min(n, inputs[0].shape[0])
  if n <= 1:
    return tower(*inputs, train=train)
  outs = [tower(*part, train=train) for part in zip(*(jnp.array_split(x, n) for x in inputs))]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)


def next_token_targets(ids: jax.Array, mask: jax.Array, prefix_len: jax.Array | None = None):
  """ids, mask [B, L] -> (targets [B, L]: ids shifted left, weights [B, L]: 1 where position
  t's target is a real token at or after prefix_len, default 1: after [CLS] / BOS)."""
  targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
  real = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1).astype(bool)
  start = jnp.ones_like(ids[:, 0]) if prefix_len is None else prefix_len
  after_prefix = jnp.arange(ids.shape[1])[None] + 1 >= start[:, None]
  return targets, (real & after_prefix).astype(jnp.float32)


def variables(params, batch_stats=None) -> dict:
  """What `model.apply` takes: the params, and BatchNorm's running statistics (the
  "batch_stats" collection) when the model has any ({} or None: none)."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


# model.classifier.input -> the towers it reads ("text_tokens": one prediction per token).
CLASSIFIER_INPUTS = {"image": ("image",), "text": ("text",), "text_tokens": ("text",),
                     "fusion": ("image", "text", "fusion")}

class MultimodalModel(nn.Module):
  image_tower: nn.Module | None
  text_tower: nn.Module | None
  fusion: nn.Module | None = None
  embed_dim: int = 0                  # 0: no joint-space projections
  vocab_size: int = 0
  itm: bool = False
  mlm: bool = False
  mlm_prob: float = 0.15
  mask_id: int = 4
  special_ids: tuple[int, ...] = (0, 2, 3)
  logit_scale_init: float = 2.6593    # log(1 / 0.07), CLIP
  logit_bias_init: float = 0.0        # SigLIP uses -10 with scale log(10)
  num_classes: int = 0                # > 0: a "classifier" head reading `classify_input`
  classify_input: str = "image"       # a key of CLASSIFIER_INPUTS
  tower_splits: int = 1               # > 1: towers run on slices of the batch (CPU speed)
  caption: bool = False               # caption_* outputs (the text tower is a decoder)
  lm: bool = False                    # lm_* outputs
  prefix_lm: bool = False             # the decoder attends to batch["prefix_len"] both ways
  dtype: Any = jnp.float32

  def setup(self):
    if self.embed_dim:
      self.image_proj = Dense(self.embed_dim, use_bias=False, dtype=self.dtype)
      self.text_proj = Dense(self.embed_dim, use_bias=False, dtype=self.dtype)
      self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.logit_bias_init), ())
    if self.itm:
      self.itm_head = Dense(2, dtype=self.dtype)
    if self.mlm:
      self.mlm_head = MlmHead(self.vocab_size, dtype=self.dtype)
    if self.num_classes:
      if self.classify_input not in CLASSIFIER_INPUTS:
        raise ValueError(f"classifier input {self.classify_input!r}: expected one of "
                         f"{sorted(CLASSIFIER_INPUTS)}")
      self.classifier = Dense(self.num_classes, dtype=self.dtype)

  def encode_image(self, images: jax.Array, *, train: bool = False):
    """-> (unit embedding [B, E] or None, tower outputs)."""
    out = in_slices(self.image_tower, self.tower_splits, images, train=train)
    emb = l2_normalize(self.image_proj(out["pooled"])) if self.embed_dim else None
    return emb, out

  def encode_text(self, ids: jax.Array, mask: jax.Array, *, train: bool = False):
    out = in_slices(self.text_tower, self.tower_splits, ids, mask, train=train)
    emb = l2_normalize(self.text_proj(out["pooled"])) if self.embed_dim else None
    return emb, out

  def decode_text(self, ids: jax.Array, mask: jax.Array, cache=None, *, image_tokens=None,
                  prefix_len=None, logits_at=None, train: bool = False):
    """The causal text tower on `ids` appended after the tokens held in `cache` (a
    attention.KVCache from `text_tower.empty_cache`) -> its outputs, out["cache"] advanced;
    cache None: on `ids` alone. `image_tokens` [B, M, D] (from `image_memory`) feed the
    decoder's cross-attention, or precede the text as its image prefix (with a cache: once,
    at the prefill); `prefix_len` [B] is its bidirectional text prefix (a prefix-LM's
    prompt); `logits_at` [B]: the logits [B, V] at those positions only (TextEncoder)."""
    return self.text_tower(ids, mask, cache=cache, kv=image_tokens, prefix_len=prefix_len,
                           logits_at=logits_at, train=train)

  def image_memory(self, images: jax.Array) -> jax.Array:
    """[B, H, W, C] -> the image tokens [B, M, D] a decoder reads (cross-attention or
    image prefix)."""
    return self.encode_image(images)[1]["tokens"]

  def match_logits(self, image_tokens, text_tokens, text_mask, *, train: bool = False):
    """ITM logits [B, 2] (column 1 = "matches") for aligned rows of the inputs."""
    fused = self.fusion(text_tokens, text_mask, image_tokens, train=train)
    return self.itm_head(fused[:, 0]).astype(jnp.float32)

  def class_logits(self, img, txt, text_mask, *, train: bool = False) -> jax.Array:
    """[B, C] from the towers' outputs (None for a tower that was not run); [B, L, C]
    for "text_tokens", whose logits at padding are computed but mean nothing."""
    if self.classify_input == "image":
      features = img["pooled"]
    elif self.classify_input == "text":
      features = txt["pooled"]
    elif self.classify_input == "text_tokens":
      features = txt["tokens"]                               # [B, L, D]
    else:
      features = self.fusion(txt["tokens"], text_mask, img["tokens"], train=train)[:, 0]
    return self.classifier(features).astype(jnp.float32)

  def classify(self, batch: dict[str, jax.Array], *, train: bool = False) -> jax.Array:
    """Class logits [B, C] (token logits [B, L, C] for "text_tokens"), running only the
    towers the classifier reads."""
    img = txt = None
    if self.classify_input in ("image", "fusion"):
      img = self.encode_image(jnp.asarray(batch["image"]), train=train)[1]
    if self.classify_input in ("text", "text_tokens", "fusion"):
      txt = self.encode_text(jnp.asarray(batch["text"]), jnp.asarray(batch["text_mask"]),
                             train=train)[1]
    return self.class_logits(img, txt, batch.get("text_mask"), train=train)

  def __call__(self, batch: dict[str, jax.Array], *, train: bool = False) -> dict[str, Any]:
    batch = {k: jnp.asarray(batch[k]) for k in ("image", "text", "text_mask", "prefix_len")
             if k in batch}
    out: dict[str, Any] = {}
    img_emb = img = txt_emb = txt = None
    if self.image_tower is not None:
      img_emb, img = self.encode_image(batch["image"], train=train)
    # A captioner alone needs no text-only pass: its decoder pass reads the text.
    text_only = self.embed_dim or self.num_classes or self.itm or self.mlm or self.lm
    if self.text_tower is not None and (text_only or not self.caption):
      txt_emb, txt = self.encode_text(batch["text"], batch["text_mask"], train=train)
    if self.caption:
      out.update(self._caption(batch, img, train))
    if self.lm:
      targets, weights = next_token_targets(batch["text"], batch["text_mask"])
      out.update(lm_logits=txt["logits"], lm_targets=targets, lm_weights=weights)
    if self.num_classes:
      key = "token_logits" if self.classify_input == "text_tokens" else "class_logits"
      out[key] = self.class_logits(img, txt, batch.get("text_mask"), train=train)
    if self.embed_dim and img is not None and txt is not None:
      out["image_emb"], out["text_emb"] = img_emb, txt_emb
      out["logit_scale"] = jnp.exp(jnp.minimum(self.logit_scale, jnp.log(100.0)))
      out["logit_bias"] = self.logit_bias
    if self.itm:
      out.update(self._itm(batch, img_emb, img["tokens"], txt_emb, txt["tokens"], train))
    if self.mlm:
      out.update(self._mlm(batch, img["tokens"], train))
    return out

  def _caption(self, batch, img, train):
    ids, mask = batch["text"], batch["text_mask"]
    prefix_len = batch.get("prefix_len")
    image_tokens = img["tokens"] if self.text_tower.reads_images else None
    dec = self.decode_text(ids, mask, image_tokens=image_tokens,
                           prefix_len=prefix_len if self.prefix_lm else None, train=train)
    targets, weights = next_token_targets(ids, mask, prefix_len)
    return {"caption_logits": dec["logits"], "caption_targets": targets,
            "caption_weights": weights}

  def _itm(self, batch, img_emb, img_tokens, txt_emb, txt_tokens, train):
    ids, mask = batch["text"], batch["text_mask"]
    b = ids.shape[0]
    # Pairs whose texts are identical are positives too: never use them as negatives.
    same = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1) | jnp.eye(b, dtype=bool)
    sim = img_emb @ txt_emb.T                                  # [B_img, B_txt]
    r_txt, r_img = jax.random.split(self.make_rng("itm"))
    neg_txt = hard_negatives(sim, same, r_txt)                 # a text for each image
    neg_img = hard_negatives(sim.T, same.T, r_img)             # an image for each text
    image_tokens = jnp.concatenate([img_tokens, img_tokens, img_tokens[neg_img]])
    text_tokens = jnp.concatenate([txt_tokens, txt_tokens[neg_txt], txt_tokens])
    text_mask = jnp.concatenate([mask, mask[neg_txt], mask])
    logits = self.match_logits(image_tokens, text_tokens, text_mask, train=train)
    labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
    return {"itm_logits": logits, "itm_labels": labels,
            "itm_neg_text": neg_txt, "itm_neg_image": neg_img}

  def _mlm(self, batch, img_tokens, train):
    ids, mask = batch["text"], batch["text_mask"]
    masked, weights = mask_tokens(ids, mask, self.make_rng("mlm"), prob=self.mlm_prob,
                                  mask_id=self.mask_id, vocab_size=self.vocab_size,
                                  special_ids=self.special_ids)
    txt = self.text_tower(masked, mask, train=train)
    fused = self.fusion(txt["tokens"], mask, img_tokens, train=train)
    return {"mlm_logits": self.mlm_head(fused), "mlm_targets": ids, "mlm_weights": weights}
