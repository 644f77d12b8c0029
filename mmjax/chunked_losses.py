"""CLIP's contrastive and SigLIP's sigmoid loss with the batch split over devices.

The gathered losses (mmjax/objectives.py) form the whole [B, B] logit matrix. Here each
of the n devices on the batch axes keeps its own b = B / n images and computes one
[b, b] logit block at a time: the text embeddings (and token ids, which say which pairs
are positives) travel around a ring of devices with `lax.ppermute`, so after n blocks
every image has met every text, and no device ever holds more than b x b logits (the
backward pass recomputes each block rather than storing n of them). Losses, metrics and
gradients equal the gathered versions'.

- sigmoid: a sum of independent pair terms; each device sums its blocks, then a psum.
- contrastive: a softmax over each image's row and each text's column. The row
  log-sum-exp accumulates online on the image's device; the column one travels with
  the text chunk and comes home after the last block.

`objective_options.<name>.chunked=True` selects these; they run inside a jitted step
traced under its mesh (parallel.in_mesh), and `ring_size()` is 1 (the objectives then
use the gathered version) when there is none.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array
# The mesh axes that split the batch (mmjax/parallel.py BATCH_AXES).
BATCH_AXES = ("data", "fsdp")


def _ring_axes() -> tuple[tuple[str, ...], int]:
  """(the active mesh's batch axes, the number of devices on them)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), 1
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return axes, math.prod(dict(mesh.shape)[a] for a in axes)


def ring_size() -> int:
  """Devices the batch is split over in the mesh being traced under (1: none)."""
  return _ring_axes()[1]


def _positives(ids: Array, other: Array) -> Array:
  """[b, c] True where two rows hold the same token sequence (ids [b, L], other [c, L]).
  Token by token, so that no [b, c, L] array is formed (it would outweigh the block)."""
  same = ids[:, None, 0] == other[None, :, 0]
  for t in range(1, ids.shape[1]):
    same &= ids[:, None, t] == other[None, :, t]
  return same


def _pass(tree, axes, n):
  """Every device's `tree` to the next device on the ring."""
  return jax.lax.ppermute(tree, axes, [(i, (i + 1) % n) for i in range(n)])


def _ring(block, carry, chunk, axes, n):
  """(carry, chunk) after `block` on this device's own chunk, then on each of the n - 1
  others, passed along the ring before each. block(carry, chunk) -> (carry, chunk) may
  update what travels with the chunk. Each step is rematerialised, so the backward pass
  keeps the chunks (n x [b, D]: what an all-gather of the embeddings would hold), never
  the [b, b] blocks."""
  carry, chunk = block(carry, chunk)

  def step(state, _):
    carry, chunk = state
    return block(carry, _pass(chunk, axes, n)), None

  (carry, chunk), _ = jax.lax.scan(jax.checkpoint(step), (carry, chunk), None, length=n - 1)
  return carry, chunk


def _sigmoid_shard(img, txt, ids, scale, bias, *, axes, n):
  """img, txt [b, D], ids [b, L]: this device's rows -> the global loss."""

  def block(total, chunk):
    other, other_ids = chunk
    logits = scale * img @ other.T + bias                            # [b, b]
    labels = 2.0 * _positives(ids, other_ids).astype(jnp.float32) - 1.0
    return total + jnp.sum(jax.nn.log_sigmoid(labels * logits)), chunk

  total, _ = _ring(block, 0.0, (txt, ids), axes, n)
  return -jax.lax.psum(total, axes) / (img.shape[0] * n)


def _lse_update(m, s, logits, axis):
  """Online log-sum-exp along `axis`: (running max m, sum s of exp(x - m)) after
  `logits`. The max is a constant to autodiff; m + log(s) has the exact gradient."""
  m_new = jax.lax.stop_gradient(jnp.maximum(m, logits.max(axis)))
  shift = jnp.expand_dims(m_new, axis)
  return m_new, s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - shift), axis)


def _contrastive_shard(img, txt, ids, scale, *, axes, n):
  """img, txt [b, D], ids [b, L]: this device's rows -> (global loss, i2t accuracy).

  Per row (image) and per column (text): running log-sum-exp (m, s), the sum of the
  logits of its positives, their count; per row also the best logit overall and among
  positives (accuracy). Column state travels with its text chunk."""
  b = img.shape[0]
  empty = lambda: (jnp.full((b,), -jnp.inf), jnp.zeros((b,)), jnp.zeros((b,)), jnp.zeros((b,)))

  def block(rows, chunk):
    other, other_ids, cols = chunk
    logits = scale * img @ other.T                                   # [b img, b txt]
    same = _positives(ids, other_ids)
    on_pos = jnp.where(same, logits, 0.0)
    (m, s, pos, cnt), best, best_pos = rows
    m, s = _lse_update(m, s, logits, 1)
    rows = ((m, s, pos + on_pos.sum(1), cnt + same.sum(1)),
            jnp.maximum(best, jax.lax.stop_gradient(logits.max(1))),
            jnp.maximum(best_pos, jax.lax.stop_gradient(
                jnp.where(same, logits, -jnp.inf).max(1))))
    cm, cs, cpos, ccnt = cols
    cm, cs = _lse_update(cm, cs, logits, 0)
    return rows, (other, other_ids, (cm, cs, cpos + on_pos.sum(0), ccnt + same.sum(0)))

  rows = (empty(), jnp.full((b,), -jnp.inf), jnp.full((b,), -jnp.inf))
  (row, best, best_pos), (_, _, col) = _ring(block, rows, (txt, ids, empty()), axes, n)
  col = _pass(col, axes, n)                   # the column state back to its text's device
  # Cross-entropy against targets spread evenly over the positives: lse - mean(positives).
  xent = lambda m, s, pos, cnt: jnp.sum(m + jnp.log(s) - pos / cnt)
  total, correct = jax.lax.psum((xent(*row) + xent(*col), jnp.sum(best_pos >= best)), axes)
  return total / (2 * b * n), correct / (b * n)


def _sharded(fn, n_scalars: int, n_out: int = 1):
  """fn(img, txt, ids, *scalars) over the active mesh: the three batch arrays split over
  its batch axes, the scalars replicated; n_out replicated outputs."""
  axes, n = _ring_axes()
  out = P() if n_out == 1 else (P(),) * n_out
  return jax.shard_map(functools.partial(fn, axes=axes, n=n),
                       in_specs=(P(axes),) * 3 + (P(),) * n_scalars, out_specs=out)


def sigmoid(outputs, batch):
  """objectives.sigmoid, chunked (see the module docstring)."""
  loss = _sharded(_sigmoid_shard, 2)(outputs["image_emb"], outputs["text_emb"],
                                     batch["text"], outputs["logit_scale"],
                                     outputs["logit_bias"])
  return loss, {"bias": outputs["logit_bias"], "temperature": 1 / outputs["logit_scale"]}


def contrastive(outputs, batch):
  """objectives.contrastive, chunked (see the module docstring). `i2t_acc` counts an image
  right when a positive text has its highest logit (ties go to the positive)."""
  loss, acc = _sharded(_contrastive_shard, 1, 2)(outputs["image_emb"], outputs["text_emb"],
                                                  batch["text"], outputs["logit_scale"])
  return loss, {"i2t_acc": acc, "temperature": 1 / outputs["logit_scale"]}
