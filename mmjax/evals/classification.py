"""Classifier reports: scikit-learn's per-class precision / recall / F1 / support with
macro and weighted averages, as text, JSON and a confusion-matrix PNG."""
from __future__ import annotations

import io
import json
import logging
import pathlib
from typing import Sequence

import jax
import numpy as np
from matplotlib.figure import Figure

from mmjax.evals.context import EvalContext
from mmjax.io import storage

log = logging.getLogger("mmjax")


def report(labels: np.ndarray, predicted: np.ndarray, names: Sequence[str]) -> dict:
  """{"text": the classification report as scikit-learn prints it, "report": its dict
  (per class and "macro avg", "weighted avg", "accuracy"), "confusion": [C, C] counts,
  rows = true class, columns = predicted}."""
  # Only the evaluators import scikit-learn.
  from sklearn.metrics import classification_report, confusion_matrix
  ids = list(range(len(names)))
  kw = dict(labels=ids, target_names=list(names), digits=4, zero_division=0)
  return {"text": classification_report(labels, predicted, **kw),
          "report": classification_report(labels, predicted, output_dict=True, **kw),
          "confusion": confusion_matrix(labels, predicted, labels=ids)}


def plot_confusion(confusion: np.ndarray, names: Sequence[str], path: str | pathlib.Path,
                   title: str = "") -> pathlib.Path:
  """Counts with row-normalised shading; a bare Figure, so no pyplot backend switch."""
  n = len(names)
  fig = Figure(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
  ax = fig.subplots()
  rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
  for i in range(n):
    for j in range(n):
      if confusion[i, j]:
        ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black")
  ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
  ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
  ax.set_yticklabels(names, fontsize=7)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
  fig.tight_layout()
  path = storage.as_path(path)      # a local file or a URL (a gs:// workdir's reports)
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  path.write_bytes(png.getvalue())
  return path


def write(rep: dict, directory: str | pathlib.Path, name: str, names: Sequence[str]) -> None:
  """<name>.json (report + confusion) and <name>_confusion.png in `directory`."""
  directory = storage.as_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  payload = {"report": rep["report"], "confusion": rep["confusion"].tolist(),
             "class_names": list(names)}
  (directory / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
  plot_confusion(rep["confusion"], names, directory / f"{name}_confusion.png", title=name)


def evaluate(ctx: EvalContext, ev) -> dict[str, float]:
  """The model's classifier on `ev.split`: accuracy, macro and weighted P/R/F1, and
  per-class F1; logs scikit-learn's table and writes <workdir>/reports/<name>.json
  and <name>_confusion.png."""
  split = ev.get("split", "test")
  label = ev.get("label", "label")
  got = ctx.embedder.classify(ctx.batches(ev), label)
  names = ctx.classnames(ev, label)
  rep = report(got[label], got["logits"].argmax(-1), names)
  name = ctx.name or "classification"
  log.info("%s on %s (%d examples):\n%s", name, split, len(got[label]), rep["text"])
  if ctx.workdir is not None and jax.process_index() == 0:
    write(rep, ctx.workdir / "reports", name, names)
  r = rep["report"]
  out = {"acc": float(r["accuracy"])}
  for avg in ("macro", "weighted"):
    out.update({f"{avg}_{m}": float(r[f"{avg} avg"][k]) for m, k in
                (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"))})
  out.update({f"f1_{n}": float(r[n]["f1-score"]) for n in names})
  return out
