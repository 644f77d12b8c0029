"""Losses. Each is `f(outputs, batch) -> (scalar loss, metrics dict)`.

`config.objectives = {name: weight}` picks and weights them; `combined` sums
them in one step. An objective with keyword options (`classify`'s label key)
takes them from `config.objective_options.<name>`. Adding a loss is one
function plus one registry line.
Everything here runs in float32.
"""
from __future__ import annotations

from typing import Callable, Mapping

import functools

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
Objective = Callable[[Mapping[str, Array], Mapping[str, Array]], tuple[Array, dict[str, Array]]]


def _same_text(batch) -> Array:
  """[B, B] True where two rows carry the same token sequence (a true positive)."""
  ids = batch["text"]
  return jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)


def contrastive(outputs, batch):
  """CLIP's symmetric softmax loss. Rows with identical captions are all
  positives (the target spreads evenly over them), so duplicate captions in a
  batch are not pushed apart."""
  img, txt = outputs["image_emb"], outputs["text_emb"]
  logits = outputs["logit_scale"] * img @ txt.T                    # [B_img, B_txt]
  targets = _same_text(batch).astype(jnp.float32)
  targets = targets / targets.sum(axis=1, keepdims=True)
  i2t = optax.softmax_cross_entropy(logits, targets).mean()
  t2i = optax.softmax_cross_entropy(logits.T, targets.T).mean()
  correct = jnp.take_along_axis(targets, jnp.argmax(logits, axis=1)[:, None], axis=1) > 0
  return (i2t + t2i) / 2, {"i2t_acc": correct.mean(), "temperature": 1 / outputs["logit_scale"]}


def sigmoid(outputs, batch):
  """SigLIP: independent binary terms for every image-text pair, summed over
  texts and averaged over images; identical captions count as positives."""
  img, txt = outputs["image_emb"], outputs["text_emb"]
  logits = outputs["logit_scale"] * img @ txt.T + outputs["logit_bias"]
  labels = 2.0 * _same_text(batch).astype(jnp.float32) - 1.0
  loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / img.shape[0]
  return loss, {"bias": outputs["logit_bias"], "temperature": 1 / outputs["logit_scale"]}


def itm(outputs, batch):
  logits, labels = outputs["itm_logits"], outputs["itm_labels"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, {"acc": (jnp.argmax(logits, -1) == labels).mean()}


def mlm(outputs, batch):
  logits, targets, w = outputs["mlm_logits"], outputs["mlm_targets"], outputs["mlm_weights"]
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  n = jnp.maximum(w.sum(), 1.0)
  acc = ((jnp.argmax(logits, -1) == targets) * w).sum() / n
  return (per_token * w).sum() / n, {"acc": acc}


def classify(outputs, batch, *, label: str = "label", label_smoothing: float = 0.0):
  """Softmax cross-entropy of `class_logits` [B, C] against the integer `batch[label]`,
  with targets smoothed toward uniform by `label_smoothing`; rows with valid = 0
  (eval padding) do not count."""
  logits = outputs["class_logits"]
  if label not in batch:
    raise KeyError(f"objective 'classify' reads batch[{label!r}], which this data does not "
                   f"have; its keys: {sorted(batch)} (set objective_options.classify.label)")
  labels = batch[label]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  per_example = optax.softmax_cross_entropy(logits, targets)
  w = batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones_like(per_example)
  n = jnp.maximum(w.sum(), 1.0)
  acc = ((jnp.argmax(logits, -1) == labels) * w).sum() / n
  return (per_example * w).sum() / n, {"acc": acc}


OBJECTIVES: dict[str, Objective] = {
    "contrastive": contrastive,
    "sigmoid": sigmoid,
    "itm": itm,
    "mlm": mlm,
    "classify": classify,
}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise KeyError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]


def combined(weights: Mapping[str, float], options: Mapping[str, Mapping] | None = None
             ) -> Objective:
  """The weighted sum of the named objectives, each given its `options[name]` as
  keyword arguments; metrics are prefixed by name."""
  options = options or {}
  unused = set(options) - set(weights)
  if unused:
    raise KeyError(f"objective_options for {sorted(unused)}, which are not in objectives "
                   f"{sorted(weights)}")
  fns = {name: functools.partial(get(name), **dict(options.get(name, {}))) for name in weights}

  def loss_fn(outputs, batch):
    total, metrics = 0.0, {}
    for name, fn in fns.items():
      loss, m = fn(outputs, batch)
      total = total + weights[name] * loss
      metrics[f"{name}_loss"] = loss
      metrics.update({f"{name}_{k}": v for k, v in m.items()})
    metrics["loss"] = total
    return total, metrics

  return loss_fn
