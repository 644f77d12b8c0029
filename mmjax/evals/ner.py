"""Entity-level scores of a token classifier, with seqeval's (CoNLL) rules: an entity is
a BIO span, and it counts as found only when its type and both ends are right."""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Sequence

import jax
import numpy as np

from mmjax.evals.context import EvalContext
from mmjax.io import storage

log = logging.getLogger("mmjax")


def word_tags(logits: np.ndarray, labels: np.ndarray, names: Sequence[str]
              ) -> tuple[list[list[str]], list[list[str]]]:
  """(true, predicted) tag sequences, one per row, one tag per labelled word.

  logits [N, L, C], labels [N, L] with -1 off each word's first token: the word's
  prediction is its first token's argmax (the tokens a word splits into, and the
  words that truncation cut off, are not scored).
  """
  predicted = logits.argmax(-1)
  true, pred = [], []
  for row_labels, row_pred in zip(labels, predicted):
    first = row_labels >= 0
    true.append([names[i] for i in row_labels[first]])
    pred.append([names[i] for i in row_pred[first]])
  return true, pred


def entity_types(names: Sequence[str]) -> list[str]:
  """The entity types of a BIO tag vocabulary: ["O", "B-REL", "I-REL"] -> ["REL"]."""
  return sorted({n[2:] for n in names if n[:2] in ("B-", "I-")})


def report(true: list[list[str]], pred: list[list[str]]) -> dict:
  """{"text": seqeval's classification report, "report": its dict (per type, "micro avg",
  "macro avg", "weighted avg"), "word_acc": the fraction of words tagged right}."""
  # Only this evaluator needs seqeval.
  from seqeval.metrics import accuracy_score, classification_report
  kw = dict(digits=4, zero_division=0)
  return {"text": classification_report(true, pred, **kw),
          "report": classification_report(true, pred, output_dict=True, **kw),
          "word_acc": float(accuracy_score(true, pred))}


def write(rep: dict, directory: str | pathlib.Path, name: str, names: Sequence[str]) -> None:
  """<name>.json in `directory`: the report and the tag vocabulary."""
  directory = storage.as_path(directory)     # a local folder or a URL
  directory.mkdir(parents=True, exist_ok=True)
  scores = {k: {m: v.item() if isinstance(v, np.generic) else v for m, v in row.items()}
            for k, row in rep["report"].items()}   # seqeval gives numpy scalars
  payload = {"report": scores, "word_acc": rep["word_acc"], "tag_names": list(names)}
  (directory / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")


def evaluate(ctx: EvalContext, ev) -> dict[str, float]:
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
  true, pred = word_tags(got["logits"], got[label], names)
  rep = report(true, pred)
  log.info("%s on %s (%d texts):\n%s", name, split, len(true), rep["text"])
  if ctx.workdir is not None and jax.process_index() == 0:
    write(rep, ctx.workdir / "reports", name, names)
  r = rep["report"]
  out = {m: float(r["micro avg"][k]) for m, k in
         (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"))}
  out["word_acc"] = rep["word_acc"]
  out.update({f"f1_{t}": float(r[t]["f1-score"]) if t in r else 0.0
              for t in entity_types(names)})
  return out
