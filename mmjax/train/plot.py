"""One PNG per run: training curves on the left, eval metrics over steps on the right."""
from __future__ import annotations

import pathlib

from matplotlib.figure import Figure

from mmjax.train.metrics_writer import read_metrics


def plot_run(workdir: str | pathlib.Path, filename: str = "training.png") -> pathlib.Path:
  rows = read_metrics(workdir)
  train = [r for r in rows if r["kind"] == "train"]
  evals = [r for r in rows if r["kind"] == "eval"]
  # A bare Figure (no pyplot): no global backend switch, so notebooks keep theirs.
  fig = Figure(figsize=(12, 4.5))
  ax_loss, ax_eval = fig.subplots(1, 2)
  loss_keys = sorted({k for r in train for k in r if k == "loss" or k.endswith("_loss")})
  for k in loss_keys:
    pts = [(r["step"], r[k]) for r in train if k in r]
    ax_loss.plot(*zip(*pts), label=k, lw=2 if k == "loss" else 1)
  ax_loss.set(xlabel="step", ylabel="loss", title="training losses")
  ax_loss.set_yscale("log")
  if loss_keys:
    ax_loss.legend(fontsize=8)
  eval_keys = sorted({k for r in evals for k in r
                      if k not in ("step", "kind") and 0.0 <= r[k] <= 1.0})
  if len({r["step"] for r in evals}) > 1:
    for k in eval_keys:
      pts = [(r["step"], r[k]) for r in evals if k in r]
      ax_eval.plot(*zip(*pts), marker="o", label=f"{k} = {pts[-1][1]:.3f}")
    ax_eval.set(xlabel="step", ylabel="held-out metric", title="evaluation", ylim=(0, 1.02))
    if eval_keys:
      ax_eval.legend(fontsize=7, loc="lower right")
  elif eval_keys:   # one evaluation (at the end): a bar per metric
    last = evals[-1]
    ax_eval.barh(eval_keys, [last[k] for k in eval_keys])
    for y, k in enumerate(eval_keys):
      ax_eval.text(min(last[k], 0.85) + 0.01, y, f"{last[k]:.3f}", va="center", fontsize=8)
    ax_eval.set(xlim=(0, 1), title=f"held-out metrics at step {last['step']}")
    ax_eval.tick_params(axis="y", labelsize=7)
  fig.tight_layout()
  out = pathlib.Path(workdir) / filename
  fig.savefig(out, dpi=100)
  return out
