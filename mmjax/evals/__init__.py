"""Evaluators by name: `config.evals.<name> = {type: ..., split: ..., ...}`.

Each evaluator is `evaluate(ctx, ev) -> {metric: float}` in the module of its maths;
results are reported as `<name>_<metric>`. Adding one is a module plus a registry line.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from mmjax.evals import (captioning, classification, itm, linear_probe, ner, retrieval,
                         zeroshot)
from mmjax.evals.context import EvalContext

EVALUATORS: dict[str, Callable[[EvalContext, Any], dict[str, float]]] = {
    "zeroshot": zeroshot.evaluate,
    "retrieval": retrieval.evaluate,
    "itm": itm.evaluate,
    "linear_probe": linear_probe.evaluate,
    "classification": classification.evaluate,
    "ner": ner.evaluate,
    "captioning": captioning.evaluate,
    "vqa_gen": captioning.evaluate_vqa,
}


def check_evals(evals) -> None:
  """Every `config.evals.<name>.type` is known (checked before any compute)."""
  for name, ev in evals.items():
    if ev.get("type") not in EVALUATORS:
      raise KeyError(f"evals.{name}.type={ev.get('type')!r} unknown; known: "
                     f"{sorted(EVALUATORS)}")


def run_evals(ctx: EvalContext, evals) -> dict[str, float]:
  check_evals(evals)
  out = {}
  for name, ev in evals.items():
    named = dataclasses.replace(ctx, name=name)    # shares the embedding cache
    out.update({f"{name}_{k}": v for k, v in EVALUATORS[ev.type](named, ev).items()})
  return out
