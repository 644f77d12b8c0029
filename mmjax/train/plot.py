"""One PNG per run: training curves on the left, eval metrics over steps on the right."""
from __future__ import annotations

import io
import logging
import math
import pathlib

from matplotlib.figure import Figure

from mmjax.io import storage
from mmjax.train.metrics_writer import FILENAME, read_metrics

log = logging.getLogger("mmjax")


def plot_run(workdir: str | pathlib.Path,
             filename: str = "training.png") -> pathlib.Path | None:
  """Draw <workdir>/<filename> from its metrics.jsonl and return its path.

  The last thing a finished run does, so it never fails the run: with nothing to
  draw, or a picture that cannot be drawn or saved, it logs a warning and returns
  None. Rows without a numeric step or a kind, and values that are not finite
  numbers, are left out; a step logged twice is drawn once, with its last value.
  """
  out = storage.as_path(workdir) / filename    # a local folder or a URL (gs://...)
  rows = read_metrics(workdir)
  good = [r for r in rows if _finite(r.get("step")) and isinstance(r.get("kind"), str)]
  if len(good) < len(rows):
    log.warning("%s: left out %d metrics row(s) without a numeric step or a kind", out,
                len(rows) - len(good))
  train = [r for r in good if r["kind"] == "train"]
  evals = [r for r in good if r["kind"] == "eval"]
  losses = {k: _series(train, k) for k in sorted({k for r in train for k in r})
            if k == "loss" or k.endswith("_loss")}
  losses = {k: pts for k, pts in losses.items() if pts}
  scores = {k: _series(evals, k) for k in sorted({k for r in evals for k in r} - {"step", "kind"})}
  scores = {k: pts for k, pts in scores.items()
            if any(0.0 <= v <= 1.0 for _, v in pts)}    # accuracies, recalls: not counts
  if not losses and not scores:
    log.warning("%s not drawn: no training loss or evaluation in %s", out,
                storage.as_path(workdir) / FILENAME)
    return None
  try:
    png = io.BytesIO()          # drawn whole first: a failed drawing leaves no file
    _draw(losses, scores).savefig(png, format="png", dpi=100)
    out.write_bytes(png.getvalue())
  # OSError: the disk is full or the workdir read-only. ValueError/OverflowError:
  # matplotlib refusing finite but extreme values (axis limits, figure size). Either
  # way the run's checkpoints and metrics are saved; only the picture is missing.
  except (OSError, ValueError, OverflowError) as e:
    log.warning("%s not drawn: %s: %s", out, type(e).__name__, e)
    return None
  return out


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(rows: list[dict], key: str) -> list[tuple[float, float]]:
  """(step, value) of `key`, by step; a repeated step keeps its last (most recent) value."""
  return sorted({r["step"]: r[key] for r in rows if _finite(r.get(key))}.items())


def _draw(losses: dict[str, list], scores: dict[str, list]) -> Figure:
  # A bare Figure (no pyplot): no global backend switch, so notebooks keep theirs.
  fig = Figure(figsize=(12, 4.5))
  ax_loss, ax_eval = fig.subplots(1, 2)
  for k, pts in losses.items():
    ax_loss.plot(*zip(*pts), label=k, lw=2 if k == "loss" else 1)
  ax_loss.set(xlabel="step", ylabel="loss", title="training losses")
  if losses:
    if all(v > 0 for pts in losses.values() for _, v in pts):
      ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
  steps = {s for pts in scores.values() for s, _ in pts}
  if len(steps) > 1:
    for k, pts in scores.items():
      ax_eval.plot(*zip(*pts), marker="o", label=f"{k} = {pts[-1][1]:.3f}")
    ax_eval.set(xlabel="step", ylabel="held-out metric", title="evaluation", ylim=(0, 1.02))
    ax_eval.legend(fontsize=7, loc="lower right")
  elif scores:   # one evaluation (at the end): a bar per metric
    last = {k: pts[-1][1] for k, pts in scores.items()}
    ax_eval.barh(list(last), list(last.values()))
    for y, v in enumerate(last.values()):
      ax_eval.text(min(v, 0.85) + 0.01, y, f"{v:.3f}", va="center", fontsize=8)
    ax_eval.set(xlim=(0, 1), title=f"held-out metrics at step {steps.pop()}")
    ax_eval.tick_params(axis="y", labelsize=7)
  fig.tight_layout()
  return fig
