"""Beam search as Hugging Face defines it (early_stopping=False), vectorised and jit-able.

Per prompt, K running beams and K finished hypotheses. Each step takes the 2K best
continuations of all running beams (by summed log-probability). Of these, the ones
that end in EOS (or reach max_new_tokens) and rank in the top K become finished
candidates, scored sum log p / length ** length_penalty with length the number of new
tokens; the K best finished are kept. The K best that did not stop keep running.
A prompt stops taking finished hypotheses once it has K and its best running beam,
scored at its current length, cannot beat the worst of them; the loop ends when every
prompt has stopped or after max_new_tokens steps. The model runs once per step after the
first (which reads the prompts' logits): at most max_new_tokens - 1 times.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

NEG = -1.0e9   # Hugging Face's "never pick this" score, added rather than assigned


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, M, ...] rows picked by idx [B, J] -> [B, J, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


class Beams(NamedTuple):
  """Per prompt: K running beams and the K best finished hypotheses ([B, K, N] tokens,
  [B, K] scores), and whether the prompt still takes finished ones (open [B])."""
  run_tokens: jax.Array
  run_scores: jax.Array      # sum of log-probabilities
  fin_tokens: jax.Array
  fin_scores: jax.Array      # sum of log-probabilities / length ** length_penalty
  fin_done: jax.Array        # a real hypothesis (not a NEG placeholder)
  open: jax.Array


def search(step: Callable, logits: jax.Array, cache, s) -> tuple[jax.Array, jax.Array]:
  """step(tokens [B * K], cache) -> (logits [B * K, V], cache); logits [B, V] and cache
  after the prompts; s: decode.Settings (num_beams, max_new_tokens, length_penalty,
  eos_id, pad_id). -> finished tokens [B, K, N] and scores [B, K], best first."""
  b, v = logits.shape
  k, n, lp = s.num_beams, s.max_new_tokens, s.length_penalty
  top_k_mask = jnp.arange(2 * k) < k

  def choose(t, logits, beams: Beams) -> tuple[Beams, jax.Array]:
    """Token t of every beam, from logits [B * K, V] -> the beams after it, and the row
    [B * K] of the cache that each running beam continues."""
    run_tokens, run_scores, fin_tokens, fin_scores, fin_done, open_ = beams
    logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, v)
    total = (logp + run_scores[:, :, None]).reshape(b, k * v)
    cand_scores, flat = jax.lax.top_k(total, 2 * k)                         # [B, 2K]
    parent, tok = flat // v, (flat % v).astype(jnp.int32)
    cand = _gather(run_tokens, parent).at[:, :, t].set(tok)                 # [B, 2K, N]
    stops = (tok == s.eos_id) | (t == n - 1)

    # The K best continuations that did not stop run on.
    alive_scores = cand_scores + stops * NEG
    _, keep = jax.lax.top_k(alive_scores, k)
    run_tokens, run_scores = _gather(cand, keep), _gather(alive_scores, keep)
    rows = (jnp.arange(b)[:, None] * k + _gather(parent, keep)).reshape(-1)

    # Stopped candidates among the top K join the finished set if they rank in it.
    new = cand_scores / (t + 1.0) ** lp
    new = new + (~open_)[:, None] * NEG
    new = new + ~(stops & top_k_mask) * NEG
    merged_scores = jnp.concatenate([fin_scores, new], axis=1)
    _, best = jax.lax.top_k(merged_scores, k)
    fin_tokens = _gather(jnp.concatenate([fin_tokens, cand], axis=1), best)
    fin_scores = _gather(merged_scores, best)
    fin_done = _gather(jnp.concatenate([fin_done, stops & top_k_mask], axis=1), best)

    best_running = run_scores[:, :1] / (t + 1.0) ** lp
    worst_finished = jnp.where(fin_done, fin_scores.min(axis=1, keepdims=True), NEG)
    open_ = open_ & (best_running > worst_finished).any(axis=1)
    return Beams(run_tokens, run_scores, fin_tokens, fin_scores, fin_done, open_), rows

  # Token 0 comes from the prompts' logits; the model steps only when the loop goes on to
  # choose another token (none after the last, or once every prompt has stopped), and the
  # cache follows the beams' parents just before the step that reads it.
  def body(carry):
    t, beams, rows, cache = carry
    cache = jax.tree.map(lambda x: x[rows], cache)
    logits, cache = step(beams.run_tokens[:, :, t - 1].reshape(-1), cache)
    beams, rows = choose(t, logits, beams)
    return t + 1, beams, rows, cache

  def cond(carry):
    t, beams, *_ = carry
    return (t < n) & beams.open.any()

  # All beams start as the prompt; only the first may be extended at the first step.
  pad = jnp.full((b, k, n), s.pad_id, jnp.int32)
  beams = Beams(pad, jnp.where(jnp.arange(k) == 0, 0.0, NEG)[None].repeat(b, 0),
                pad, jnp.full((b, k), NEG), jnp.zeros((b, k), bool), jnp.ones((b,), bool))
  beams, rows = choose(jnp.int32(0), jnp.repeat(logits, k, axis=0), beams)
  cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
  _, beams, *_ = jax.lax.while_loop(cond, body, (jnp.int32(1), beams, rows, cache))
  return beams.fin_tokens, beams.fin_scores
