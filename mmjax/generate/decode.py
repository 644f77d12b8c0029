"""Decoding a causal LM (a text tower with causal=True, head="lm") with a KV cache,
optionally conditioned on images (a captioner's cross-attention, or the image tokens as
the decoder's first tokens, PaliGemma style) and on a bidirectional prompt (a prefix-LM).

The prompt is prefilled in one call, then one token per step runs inside a
`lax.while_loop` under one `jax.jit`: the number of steps taken is data, not shape,
so a run compiles once per (model, batch, prompt length, max_new_tokens, settings).

Shapes: B prompts, P prompt length (right-padded), N = max_new_tokens, V vocabulary,
K beams, n sequences returned per prompt, M image tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.generate import beam
from mmjax.generate.sampling import filter_logits
from mmjax.models.text import TextEncoder

METHODS = ("greedy", "sample", "beam")


class Decoded(NamedTuple):
  """tokens [B, n, N]: the new tokens, each sequence's EOS kept and pad_id after it.
  scores [B, n]: beam: sum of log-probabilities / length ** length_penalty (Hugging
  Face's sequence score), best first; greedy / sample: the sum of the model's
  log-probabilities of the tokens (before temperature, top-k, top-p).
  lengths [B, n]: new tokens up to and including EOS (N when none came)."""
  tokens: jax.Array
  scores: jax.Array
  lengths: jax.Array


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything static about a run (hashable: part of the jit cache key)."""
  method: str
  max_new_tokens: int
  eos_id: int
  pad_id: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_beams: int = 1
  length_penalty: float = 1.0
  num_return: int = 1


def decode(model, variables, prompt_ids, prompt_mask, *, images=None, max_new_tokens: int,
           eos_id: int,
           pad_id: int, method: str = "greedy", rng: jax.Array | None = None,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           num_beams: int = 4, length_penalty: float = 1.0, num_return: int = 1) -> Decoded:
  """Continue each prompt by up to `max_new_tokens` tokens, stopping a row at `eos_id`.

  model: a MultimodalModel whose text tower is causal with head="lm" (GPT-2 style);
  variables: what model.apply takes ({"params": ...}).
  prompt_ids, prompt_mask [B, P]: right-padded prompts, at least one real token each
  (a captioner's: [CLS] alone; a prefix-LM's prompt is its bidirectional prefix).
  images [B, H, W, C] (preprocessed): for a decoder that reads images; the image tower
  runs once, and the keys/values of its tokens are projected once into the cache (the
  cross-attention's, or the image prefix's first slots, prefilled with the prompt in one
  call), which samples and beams repeat per row.
  method "greedy"; "sample" (needs `rng`; temperature > 0, top_k >= 0 with 0 off,
  0 < top_p <= 1; num_return independent samples per prompt); "beam" (`num_beams`,
  `length_penalty`, Hugging Face's default early stopping; the num_return best).
  """
  tower = getattr(model, "text_tower", None)
  if not (isinstance(tower, TextEncoder) and tower.causal and tower.head == "lm"):
    raise ValueError("decoding needs a causal text tower with an LM head (text.causal=True, "
                     "text.head='lm')")
  _check_settings(tower, np.shape(prompt_ids), method, max_new_tokens, rng, temperature, top_k,
                  top_p, num_beams, num_return)
  if tower.reads_images and images is None:
    how = "cross-attends to" if tower.cross else "starts from"
    raise ValueError(f"this decoder {how} images: pass images [B, H, W, C]")
  if images is not None:
    if not tower.reads_images:
      raise ValueError("images given, but this decoder has no cross-attention or image "
                       "prefix to read them")
    if np.ndim(images) != 4 or np.shape(images)[0] != np.shape(prompt_ids)[0]:
      raise ValueError(f"images {np.shape(images)}: expected [B, H, W, C] with B = "
                       f"{np.shape(prompt_ids)[0]} prompts")
  if getattr(prompt_mask, "is_fully_addressable", True):   # not a multi-host global array
    _check_prompts(np.asarray(prompt_ids), np.asarray(prompt_mask))
  settings = Settings(method, max_new_tokens, eos_id, pad_id, float(temperature), top_k,
                      float(top_p), num_beams if method == "beam" else 1,
                      float(length_penalty), num_return)
  rng = jax.random.key(0) if rng is None else rng
  # Prompts sharded over the batch stay so: the cache and every step follow them.
  return decode_jit(model, settings, variables, jnp.asarray(prompt_ids, jnp.int32),
                 jnp.asarray(prompt_mask, jnp.int32), rng,
                 None if images is None else jnp.asarray(images))


def _check_prompts(ids, mask):
  if ids.ndim != 2 or ids.shape != mask.shape:
    raise ValueError(f"prompt ids {ids.shape} and mask {mask.shape} must both be [B, P]")
  real = mask.astype(bool)
  if (real[:, 1:] & ~real[:, :-1]).any():
    raise ValueError("prompts must be right-padded (mask 1s, then 0s)")
  if not real[:, 0].all():
    raise ValueError("every prompt needs at least one token")


def _check_settings(tower, prompt_shape, method, max_new_tokens, rng, temperature, top_k,
                    top_p, num_beams, num_return):
  if method not in METHODS:
    raise ValueError(f"unknown decoding method {method!r}; expected one of {METHODS}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: expected at least 1")
  if prompt_shape[-1] + max_new_tokens > tower.max_len:
    raise ValueError(f"a {prompt_shape[-1]}-token prompt plus {max_new_tokens} new tokens exceeds "
                     f"the model's context of {tower.max_len}")
  if num_return < 1:
    raise ValueError(f"num_return={num_return}: expected at least 1")
  if method == "greedy" and num_return != 1:
    raise ValueError("greedy decoding returns one sequence per prompt")
  if method == "sample":
    if rng is None:
      raise ValueError("sampling needs a PRNG key (rng=jax.random.key(seed))")
    if not temperature > 0:
      raise ValueError(f"temperature={temperature}: expected > 0 (use method='greedy')")
    if top_k < 0:
      raise ValueError(f"top_k={top_k}: expected >= 0 (0: off)")
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p={top_p}: expected 0 < top_p <= 1")
  if method == "beam":
    if num_beams < 1:
      raise ValueError(f"num_beams={num_beams}: expected at least 1")
    if num_return > num_beams:
      raise ValueError(f"num_return={num_return} exceeds num_beams={num_beams}")


def prefill(model, variables, ids, mask, cache_len: int, image_tokens=None):
  """Run the prompts (and image_tokens [B, M, D] for a decoder that reads images) into a
  fresh cache for `cache_len` text tokens; a prefix-LM's prompts are its bidirectional
  prefix (after the image tokens when they are the decoder's prefix).

  -> (next-token logits [B, V] after each prompt's last real token, the cache). The LM
  head runs at those B positions only: the prompt's other logits, [B, P, V] (a 1,000-token
  prompt and a 50k vocabulary: 200 MB a row), would go unread."""
  cache = model.text_tower.empty_cache(ids.shape[0], cache_len)
  prefix_len = mask.sum(axis=1) if getattr(model, "prefix_lm", False) else None
  out = model.apply(variables, ids, mask, cache, image_tokens=image_tokens,
                    prefix_len=prefix_len, logits_at=mask.sum(axis=1) - 1,
                    method="decode_text")
  return out["logits"], out["cache"]


def step(model, variables, tokens, cache):
  """tokens [B] appended to the cache -> (next-token logits [B, V], the cache)."""
  out = model.apply(variables, tokens[:, None], jnp.ones_like(tokens)[:, None], cache,
                    method="decode_text")
  return out["logits"][:, 0], out["cache"]


def lengths(tokens: jax.Array, eos_id: int) -> jax.Array:
  """tokens [..., N] -> new tokens up to and including the first EOS (N if none)."""
  n = tokens.shape[-1]
  first = jnp.argmax(tokens == eos_id, axis=-1)
  return jnp.where((tokens == eos_id).any(axis=-1), first + 1, n)


@functools.partial(jax.jit, static_argnums=(0, 1))
def decode_jit(model, s: Settings, variables, ids, mask, rng, images) -> Decoded:
  """`decode` without its host-side checks of the inputs' values: traceable inside another
  jit or `jax.export` (mmjax.deploy.export), and `.lower()`-able ahead of time."""
  b = ids.shape[0]
  image_tokens = None                                                   # [B, M, D]
  if images is not None:
    image_tokens = model.apply(variables, images, method="image_memory")
  if s.method == "beam":
    logits, cache = prefill(model, variables, ids, mask, ids.shape[1] + s.max_new_tokens,
                            image_tokens)
    tokens, scores = beam.search(functools.partial(step, model, variables), logits, cache, s)
    tokens, scores = tokens[:, :s.num_return], scores[:, :s.num_return]
  else:
    n = s.num_return
    ids, mask = jnp.repeat(ids, n, axis=0), jnp.repeat(mask, n, axis=0)  # [B * n, P]
    if image_tokens is not None:
      image_tokens = jnp.repeat(image_tokens, n, axis=0)
    tokens, scores = _greedy_or_sample(model, variables, ids, mask, rng, s, image_tokens)
    tokens, scores = tokens.reshape(b, n, -1), scores.reshape(b, n)
  return Decoded(tokens, scores, lengths(tokens, s.eos_id))


def _greedy_or_sample(model, variables, ids, mask, rng, s: Settings, image_tokens=None):
  """-> tokens [B, N], the sum of their log-probabilities [B]."""
  b, n = ids.shape[0], s.max_new_tokens
  logits, cache = prefill(model, variables, ids, mask, ids.shape[1] + n, image_tokens)

  def choose(t, logits):
    if s.method == "greedy":
      return jnp.argmax(logits, axis=-1)
    allowed = filter_logits(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    return jax.random.categorical(jax.random.fold_in(rng, t), allowed, axis=-1)

  def pick(t, logits, done, score):
    """Token t of each row (pad once done), its log-probability added to the score."""
    tok = jnp.where(done, s.pad_id, choose(t, logits)).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=-1)[:, 0]
    return tok, score + jnp.where(done, 0.0, logp), done | (tok == s.eos_id)

  # The model steps only to choose a next token: N - 1 steps for N tokens, none once every
  # row is done (a forward pass after the last token would be thrown away).
  def body(state):
    t, tokens, tok, cache, done, score = state
    # A finished row still steps (its pad goes unused): the batch moves together.
    logits, cache = step(model, variables, tok, cache)
    tok, score, done = pick(t, logits, done, score)
    return t + 1, tokens.at[:, t].set(tok), tok, cache, done, score

  def cond(state):
    t, *_, done, _ = state
    return (t < n) & ~done.all()

  tok, score, done = pick(0, logits, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32))
  tokens = jnp.full((b, n), s.pad_id, jnp.int32).at[:, 0].set(tok)
  state = (jnp.int32(1), tokens, tok, cache, done, score)
  _, tokens, *_, score = jax.lax.while_loop(cond, body, state)
  return tokens, score
