"""Where metrics go: metrics.jsonl (one JSON object per line) and TensorBoard.

Only process 0 writes, so a pod run leaves one copy.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Mapping

import jax


class MetricWriter:

  def __init__(self, workdir: str | pathlib.Path):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # heavy import, only on the writer
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float], kind: str = "train") -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    with self.path.open("a") as f:
      f.write(json.dumps({"step": int(step), "kind": kind, **clean}) + "\n")
    for k, v in clean.items():
      if math.isfinite(v):
        self._tb.add_scalar(f"{kind}/{k}", v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
