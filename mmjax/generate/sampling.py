"""What sampling may draw: temperature, top-k and top-p (nucleus) on next-token logits."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """logits [..., V] -> logits / temperature with the excluded tokens at -inf.

  Applied in Hugging Face's order: temperature, then top-k (0: off), then top-p
  (1.0: off), which keeps the fewest most likely tokens whose probability sums to at
  least `top_p` (the most likely token always). Tokens tied with the last kept one stay.
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ranked = -jnp.sort(-logits, axis=-1)                      # descending
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs               # mass of the more likely ones
    lowest_kept = jnp.where(before < top_p, ranked, jnp.inf).min(axis=-1, keepdims=True)
    logits = jnp.where(logits < lowest_kept, -jnp.inf, logits)
  return logits
