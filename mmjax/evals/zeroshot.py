"""Zero-shot classification from prompts (templates x class names).

Two ways to ensemble a class's prompts:
  * "mean" (CLIP's): the class weight is the mean unit embedding of its
    prompts, renormalised; right when templates are attribute-neutral
    ("a photo of a {}").
  * "max": a class scores as its best-matching prompt; right when templates
    spell out the other attributes ("a small red {}"), whose average would be
    dominated by the attributes that are not being classified.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mmjax.evals.context import EvalContext

ENSEMBLES = ("mean", "max")


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
  """Class-major: all templates of class 0, then of class 1, ..."""
  return [t.format(c) for c in classnames for t in templates]


def class_scores(image_emb: np.ndarray, prompt_emb: np.ndarray, num_classes: int,
                 ensemble: str = "mean") -> np.ndarray:
  """[N, E] images, [C * T, E] unit prompt embeddings -> [N, C] class scores."""
  per_class = prompt_emb.reshape(num_classes, -1, prompt_emb.shape[-1])   # [C, T, E]
  if ensemble == "mean":
    w = per_class.mean(axis=1)
    return image_emb @ (w / np.linalg.norm(w, axis=-1, keepdims=True)).T
  if ensemble == "max":
    return np.einsum("ne,cte->nct", image_emb, per_class).max(axis=-1)
  raise ValueError(f"zero-shot ensemble {ensemble!r}: expected one of {ENSEMBLES}")


def zeroshot_accuracy(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  return {"acc": float((np.argmax(scores, axis=1) == labels).mean())}


def evaluate(ctx: EvalContext, ev) -> dict[str, float]:
  """Accuracy on `ev.label` of `ev.split`'s images against prompts of its class names."""
  names = ctx.classnames(ev, ev.label)
  ids, mask = ctx.tokenizer.encode(prompts(names, ev.templates), ctx.data_config(ev).max_len)
  got = ctx.embedded(ev)
  scores = class_scores(got["image_emb"], ctx.embedder.texts(ids, mask), len(names),
                        ev.get("ensemble", "mean"))
  return zeroshot_accuracy(scores, got[ev.label])
