"""Zero-shot classification: a class's weight is the mean unit embedding of its
prompts (templates x class name), renormalised; an image takes the nearest class."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
  return [t.format(c) for c in classnames for t in templates]


def class_weights(text_emb: np.ndarray, num_classes: int) -> np.ndarray:
  """[C * T, E] prompt embeddings (class-major) -> [C, E] unit class weights."""
  w = text_emb.reshape(num_classes, -1, text_emb.shape[-1]).mean(axis=1)
  return w / np.linalg.norm(w, axis=-1, keepdims=True)


def zeroshot_accuracy(image_emb: np.ndarray, labels: np.ndarray,
                      weights: np.ndarray) -> dict[str, float]:
  pred = np.argmax(image_emb @ weights.T, axis=1)
  return {"acc": float((pred == labels).mean())}
