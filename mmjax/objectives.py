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

from mmjax import chunked_losses

Array = jax.Array
Objective = Callable[[Mapping[str, Array], Mapping[str, Array]], tuple[Array, dict[str, Array]]]


def _same_text(batch) -> Array:
  """[B, B] True where two rows carry the same token sequence (a true positive)."""
  ids = batch["text"]
  return jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)


def contrastive(outputs, batch, *, chunked: bool = False):
  """CLIP's symmetric softmax loss. Rows with identical captions are all
  positives (the target spreads evenly over them), so duplicate captions in a
  batch are not pushed apart. `chunked`: one [local, local] logit block per device
  at a time (mmjax/chunked_losses.py) when the batch is split over devices."""
  if chunked and chunked_losses.ring_size() > 1:
    return chunked_losses.contrastive(outputs, batch)
  img, txt = outputs["image_emb"], outputs["text_emb"]
  logits = outputs["logit_scale"] * img @ txt.T                    # [B_img, B_txt]
  targets = _same_text(batch).astype(jnp.float32)
  targets = targets / targets.sum(axis=1, keepdims=True)
  i2t = optax.softmax_cross_entropy(logits, targets).mean()
  t2i = optax.softmax_cross_entropy(logits.T, targets.T).mean()
  correct = jnp.take_along_axis(targets, jnp.argmax(logits, axis=1)[:, None], axis=1) > 0
  return (i2t + t2i) / 2, {"i2t_acc": correct.mean(), "temperature": 1 / outputs["logit_scale"]}


def sigmoid(outputs, batch, *, chunked: bool = False):
  """SigLIP: independent binary terms for every image-text pair, summed over
  texts and averaged over images; identical captions count as positives.
  `chunked`: as contrastive's."""
  if chunked and chunked_losses.ring_size() > 1:
    return chunked_losses.sigmoid(outputs, batch)
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
  (eval padding) do not count.

  A mixed batch (train/mixing.py: row i blended with row i - 1) carries `mix_lam` [B],
  the weight of each row's own label: its target is then lam * onehot(y_i)
  + (1 - lam) * onehot(y_{i-1}) before smoothing. Accuracy is against the row's own label."""
  logits = outputs["class_logits"]
  if label not in batch:
    raise KeyError(f"objective 'classify' reads batch[{label!r}], which this data does not "
                   f"have; its keys: {sorted(batch)} (set objective_options.classify.label)")
  labels = batch[label]
  onehot = jax.nn.one_hot(labels, logits.shape[-1])                  # [B, C]
  if "mix_lam" in batch:
    lam = batch["mix_lam"][:, None].astype(jnp.float32)
    onehot = lam * onehot + (1 - lam) * jnp.roll(onehot, 1, axis=0)
  targets = optax.smooth_labels(onehot, label_smoothing)
  per_example = optax.softmax_cross_entropy(logits, targets)
  w = batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones_like(per_example)
  n = jnp.maximum(w.sum(), 1.0)
  acc = ((jnp.argmax(logits, -1) == labels) * w).sum() / n
  return (per_example * w).sum() / n, {"acc": acc}


DISTILL_TEMPERATURE = 2.0   # config.distill.temperature's default; the loop passes that value


def distill(outputs, batch, *, temperature: float = DISTILL_TEMPERATURE):
  """Hinton et al.'s soft-target loss: T^2 KL(softmax(teacher / T) || softmax(student / T))
  between `teacher_class_logits` (a frozen teacher, config.distill) and `class_logits`,
  both [B, C]; T^2 keeps its gradients on the scale of a hard-label loss, so weights
  mix the two directly. Rows with valid = 0 do not count. Metric: `agree`, how often
  the student's and the teacher's argmaxes match."""
  if "teacher_class_logits" not in outputs:
    raise KeyError("objective 'distill' reads the teacher's class logits, and this run has "
                   "no teacher: set config.distill.teacher to an mmjax workdir or Hugging "
                   "Face directory of a classifier")
  student = outputs["class_logits"].astype(jnp.float32) / temperature
  teacher = outputs["teacher_class_logits"].astype(jnp.float32) / temperature
  log_p = jax.nn.log_softmax(teacher)                               # [B, C]
  kl = jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(student)), axis=-1)
  w = batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones_like(kl)
  n = jnp.maximum(w.sum(), 1.0)
  agree = ((jnp.argmax(student, -1) == jnp.argmax(teacher, -1)) * w).sum() / n
  return temperature ** 2 * (kl * w).sum() / n, {"agree": agree}


def token_classify(outputs, batch, *, label: str = "word_tags", label_smoothing: float = 0.0):
  """Softmax cross-entropy of `token_logits` [B, L, C] against `batch[label]` int [B, L],
  averaged over the labelled tokens (label >= 0: each word's first token, see
  `data.token_labels`) of rows with valid = 1; `acc` is their token accuracy."""
  logits = outputs["token_logits"]
  if label not in batch:
    raise KeyError(f"objective 'token_classify' reads batch[{label!r}], which this data does "
                   f"not have; its keys: {sorted(batch)} (set data.token_labels and "
                   f"objective_options.token_classify.label)")
  labels = batch[label]                                             # [B, L], -1: no label
  w = (labels >= 0).astype(jnp.float32)
  if "valid" in batch:
    w = w * batch["valid"].astype(jnp.float32)[:, None]
  targets = optax.smooth_labels(jax.nn.one_hot(jnp.maximum(labels, 0), logits.shape[-1]),
                                label_smoothing)
  per_token = optax.softmax_cross_entropy(logits, targets)          # [B, L]
  n = jnp.maximum(w.sum(), 1.0)
  acc = ((jnp.argmax(logits, -1) == labels) * w).sum() / n
  return (per_token * w).sum() / n, {"acc": acc}


def _next_token(outputs, batch, name: str, label_smoothing: float):
  """Teacher-forced cross-entropy of `<name>_logits` [B, L, V] against `<name>_targets`,
  averaged over the tokens `<name>_weights` marks (real, after the prefix) of rows with
  valid = 1; `acc` is their next-token accuracy."""
  logits, targets = outputs[f"{name}_logits"], outputs[f"{name}_targets"]
  w = outputs[f"{name}_weights"].astype(jnp.float32)                # [B, L]
  if "valid" in batch:
    w = w * batch["valid"].astype(jnp.float32)[:, None]
  onehot = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), label_smoothing)
  per_token = optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)
  n = jnp.maximum(w.sum(), 1.0)
  acc = ((jnp.argmax(logits, -1) == targets) * w).sum() / n
  return (per_token * w).sum() / n, {"acc": acc}


def caption(outputs, batch, *, label_smoothing: float = 0.0):
  """The decoder's next-token loss on the text given the image (captioning; VQA by
  generation, where the question is a prefix the loss skips): model.py's caption_*."""
  return _next_token(outputs, batch, "caption", label_smoothing)


def lm(outputs, batch, *, label_smoothing: float = 0.0):
  """The causal text tower's next-token loss on the text alone (GPT-style LM)."""
  return _next_token(outputs, batch, "lm", label_smoothing)


OBJECTIVES: dict[str, Objective] = {
    "contrastive": contrastive,
    "sigmoid": sigmoid,
    "itm": itm,
    "mlm": mlm,
    "classify": classify,
    "distill": distill,
    "token_classify": token_classify,
    "caption": caption,
    "lm": lm,
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
