"""Evaluators by name: `config.evals.<name> = {type: ..., split: ..., ...}`.

Each evaluator is `f(ctx, ev) -> {metric: float}`; results are reported as
`<name>_<metric>`. Adding one is a function plus a registry line.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import pathlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from mmjax import data as mmdata
from mmjax.evals import classification as _classification
from mmjax.evals import ner as _ner
from mmjax.evals.embed import Embedder
from mmjax.evals.retrieval import retrieval as _retrieval
from mmjax.evals.zeroshot import class_scores, prompts, zeroshot_accuracy

log = logging.getLogger("mmjax")

@dataclasses.dataclass
class EvalContext:
  config: ml_collections.ConfigDict
  tokenizer: Any
  embedder: Embedder
  cache: dict = dataclasses.field(default_factory=dict)
  workdir: pathlib.Path | None = None   # where evaluators write files (None: nowhere)
  name: str = ""                        # the evaluator being run (config.evals key)
  # Built data sources by (split, data config). The train loop passes one dict to
  # every evaluation, so a user's files are validated once per run, not per eval.
  sources: dict = dataclasses.field(default_factory=dict)

  def data_config(self, ev) -> ml_collections.ConfigDict:
    cfg = copy.deepcopy(self.config.data)
    with cfg.unlocked():
      for k, v in ev.get("data", {}).items():
        cfg[k] = v
    return cfg

  def source(self, ev, split: str | None = None):
    dcfg, split = self.data_config(ev), split or ev.get("split", "test")
    key = (split, dcfg.to_json())
    if key not in self.sources:
      self.sources[key] = mmdata.build_source(dcfg, split)
    return self.sources[key]

  def batches(self, ev, split: str | None = None):
    """One unshuffled pass over `split` (default ev.split), padded to whole batches."""
    split = split or ev.get("split", "test")
    batch_size = self.config.get("eval_batch_size", 256) // jax.process_count()
    return mmdata.make_iterator(self.data_config(ev), split, batch_size=batch_size,
                                train=False, tokenizer=self.tokenizer,
                                source=self.source(ev, split))

  def classnames(self, ev, label: str) -> list[str]:
    return list(ev.get("classnames", ())) or list(self.source(ev).label_names[label])

  def embedded(self, ev, match: bool = False, split: str | None = None,
               limit: int = 0) -> dict[str, np.ndarray]:
    """Embeddings of `split` (default ev.split), its first `limit` batches' worth
    of examples when limit > 0; cached per split, data config and options."""
    split = split or ev.get("split", "test")
    key = (split, self.data_config(ev).to_json(), match, limit)
    if key not in self.cache:
      batches = self.batches(ev, split)
      if limit:
        batches = itertools.islice(batches, -(-limit // self.config.get("eval_batch_size", 256)))
      self.cache[key] = self.embedder.split(batches, match=match)
    return self.cache[key]


def zeroshot(ctx: EvalContext, ev) -> dict[str, float]:
  label = ev.label
  names = ctx.classnames(ev, label)
  ids, mask = ctx.tokenizer.encode(prompts(names, ev.templates), ctx.data_config(ev).max_len)
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


def linear_probe(ctx: EvalContext, ev) -> dict[str, float]:
  """Classification accuracy of a logistic regression on frozen image embeddings,
  fit on `ev.train_examples` of the train split, scored on `ev.split`."""
  # Only this evaluator needs scikit-learn.
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  train = ctx.embedded(ev, split=ev.get("train_split", "train"),
                       limit=ev.get("train_examples", 2048))
  test = ctx.embedded(ev)
  probe = make_pipeline(StandardScaler(), LogisticRegression(C=ev.get("C", 1.0), max_iter=2000))
  probe.fit(train["image_emb"], train[ev.label])
  return {"acc": float(probe.score(test["image_emb"], test[ev.label]))}


def classification(ctx: EvalContext, ev) -> dict[str, float]:
  """The model's classifier on `ev.split`: accuracy, macro and weighted P/R/F1, and
  per-class F1; logs scikit-learn's table and writes <workdir>/reports/<name>.json
  and <name>_confusion.png."""
  split = ev.get("split", "test")
  label = ev.get("label", "label")
  got = ctx.embedder.classify(ctx.batches(ev), label)
  names = ctx.classnames(ev, label)
  rep = _classification.report(got[label], got["logits"].argmax(-1), names)
  name = ctx.name or "classification"
  log.info("%s on %s (%d examples):\n%s", name, split, len(got[label]), rep["text"])
  if ctx.workdir is not None and jax.process_index() == 0:
    _classification.write(rep, ctx.workdir / "reports", name, names)
  r = rep["report"]
  out = {"acc": float(r["accuracy"])}
  for avg in ("macro", "weighted"):
    out.update({f"{avg}_{m}": float(r[f"{avg} avg"][k]) for m, k in
                (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"))})
  out.update({f"f1_{n}": float(r[n]["f1-score"]) for n in names})
  return out


def ner(ctx: EvalContext, ev) -> dict[str, float]:
  """The token classifier on `ev.split` as a tagger: entity-level micro precision / recall /
  F1 and per-type F1 (seqeval's BIO spans), and word accuracy; logs seqeval's table and
  writes <workdir>/reports/<name>.json. Labels: `ev.label`, default data.token_labels."""
  split, name = ev.get("split", "test"), ctx.name or "ner"
  label = ev.get("label", "") or ctx.data_config(ev).get("token_labels", "")
  if not label:
    raise ValueError(f"evals.{name}: type 'ner' scores token labels; set data.token_labels "
                     f"(e.g. 'word_tags') or evals.{name}.label")
  got = ctx.embedder.classify(ctx.batches(ev), label)
  names = ctx.classnames(ev, label)
  true, pred = _ner.word_tags(got["logits"], got[label], names)
  rep = _ner.report(true, pred)
  log.info("%s on %s (%d texts):\n%s", name, split, len(true), rep["text"])
  if ctx.workdir is not None and jax.process_index() == 0:
    _ner.write(rep, ctx.workdir / "reports", name, names)
  r = rep["report"]
  out = {m: float(r["micro avg"][k]) for m, k in
         (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"))}
  out["word_acc"] = rep["word_acc"]
  out.update({f"f1_{t}": float(r[t]["f1-score"]) if t in r else 0.0
              for t in _ner.entity_types(names)})
  return out


EVALUATORS: dict[str, Callable[[EvalContext, Any], dict[str, float]]] = {
    "zeroshot": zeroshot,
    "retrieval": retrieval,
    "itm": itm,
    "linear_probe": linear_probe,
    "classification": classification,
    "ner": ner,
}


def run_evals(ctx: EvalContext, evals) -> dict[str, float]:
  out = {}
  for name, ev in evals.items():
    if ev.type not in EVALUATORS:
      raise KeyError(f"evals.{name}.type={ev.type!r} unknown; known: {sorted(EVALUATORS)}")
    named = dataclasses.replace(ctx, name=name)    # shares the embedding cache
    out.update({f"{name}_{k}": v for k, v in EVALUATORS[ev.type](named, ev).items()})
  return out
