"""Evaluators by name: `config.evals.<name> = {type: ..., split: ..., ...}`.

Each evaluator is `f(ctx, ev) -> {metric: float}`; results are reported as
`<name>_<metric>`. Adding one is a function plus a registry line.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from mmjax import data as mmdata
from mmjax.evaluate.embed import Embedder
from mmjax.evaluate.retrieval import retrieval as _retrieval
from mmjax.evaluate.zeroshot import class_scores, prompts, zeroshot_accuracy


@dataclasses.dataclass
class EvalContext:
  config: ml_collections.ConfigDict
  tokenizer: Any
  embedder: Embedder
  cache: dict = dataclasses.field(default_factory=dict)

  def data_config(self, ev) -> ml_collections.ConfigDict:
    cfg = copy.deepcopy(self.config.data)
    with cfg.unlocked():
      for k, v in ev.get("data", {}).items():
        cfg[k] = v
    return cfg

  def embedded(self, ev, match: bool = False) -> dict[str, np.ndarray]:
    dcfg = self.data_config(ev)
    key = (ev.get("split", "test"), dcfg.to_json(), match)
    if key not in self.cache:
      batches = mmdata.make_iterator(dcfg, ev.get("split", "test"),
                                     batch_size=self.config.get("eval_batch_size", 256)
                                     // jax.process_count(),
                                     train=False, tokenizer=self.tokenizer)
      self.cache[key] = self.embedder.split(batches, match=match)
    return self.cache[key]


def zeroshot(ctx: EvalContext, ev) -> dict[str, float]:
  dcfg = ctx.data_config(ev)
  label = ev.label
  names = list(ev.get("classnames", ())) or list(
      mmdata.build_source(dcfg, ev.get("split", "test")).label_names[label])
  texts = prompts(names, ev.templates)
  ids, mask = ctx.tokenizer.encode(texts, dcfg.max_len)
  got = ctx.embedded(ev)
  scores = class_scores(got["image_emb"], ctx.embedder.texts(ids, mask), len(names),
                        ev.get("ensemble", "mean"))
  return zeroshot_accuracy(scores, got[label])


def retrieval(ctx: EvalContext, ev) -> dict[str, float]:
  return _retrieval(ctx.embedded(ev))


def itm(ctx: EvalContext, ev) -> dict[str, float]:
  """Held-out matching: each image with its own caption (should match) and with
  another image's caption (should not; identical captions are left out)."""
  got = ctx.embedded(ev, match=True)
  neg = ~got["neg_same"]
  correct = np.concatenate([got["match_pos"] > 0.5, got["match_neg"][neg] <= 0.5])
  return {"acc": float(correct.mean()), "pos_acc": float((got["match_pos"] > 0.5).mean())}


EVALUATORS: dict[str, Callable[[EvalContext, Any], dict[str, float]]] = {
    "zeroshot": zeroshot,
    "retrieval": retrieval,
    "itm": itm,
}


def run_evals(ctx: EvalContext, evals) -> dict[str, float]:
  out = {}
  for name, ev in evals.items():
    if ev.type not in EVALUATORS:
      raise KeyError(f"evals.{name}.type={ev.type!r} unknown; known: {sorted(EVALUATORS)}")
    out.update({f"{name}_{k}": v for k, v in EVALUATORS[ev.type](ctx, ev).items()})
  return out
