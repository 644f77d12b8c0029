"""Early stopping on an evaluation metric; the best params are kept by Orbax (best-N).

  config.early_stop = dict(metric="report_acc", mode="max", patience=3, min_delta=0.0,
                           keep_best=1)

Every evaluation (config.eval_every) reports `metric`; one that beats the best so
far by more than `min_delta` saves the params into <workdir>/checkpoints_best,
where Orbax keeps the `keep_best` best by that metric. After `patience`
evaluations without such an improvement, or at the last step, the loop puts the
best params back into the state, evaluates them, and writes them as the final
checkpoint, so `mmjax eval` and `mmjax convert` see the best model.
Params a fine-tune keeps frozen never change, so they are not stored again.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from mmjax.io import storage
from mmjax.io.trees import drop_params, fill_params, flat, path_name

MODES = ("max", "min")


def early_stopping(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                   plan=None) -> "EarlyStopping | NoEarlyStopping":
  """The run's stopper: `EarlyStopping` when config.early_stop.metric is set, else a
  no-op with the same interface, so the loop reads the same either way."""
  if config.get("early_stop") and config.early_stop.get("metric"):
    return EarlyStopping(config, workdir, plan)
  return NoEarlyStopping()


class NoEarlyStopping:
  """Never stops, keeps nothing, reports nothing."""
  stopped = False
  best_step = None

  def state_dict(self) -> dict:
    return {}

  def load_state_dict(self, d: dict) -> None:
    pass

  def update(self, step: int, metrics: dict[str, float], params: Any,
             batch_stats: Any = None) -> bool:
    return False

  def final_params(self, params: Any, step: int, at_end: bool, batch_stats: Any = None
                   ) -> tuple[Any, Any] | None:
    return None

  def result(self) -> dict:
    return {}

  def close(self) -> None:
    pass


class EarlyStopping:

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
               plan=None):
    e = config.early_stop
    self.metric, self.mode = e.metric, e.get("mode", "max")
    self.patience, self.min_delta = int(e.get("patience", 3)), float(e.get("min_delta", 0.0))
    if self.mode not in MODES:
      raise ValueError(f"early_stop.mode={self.mode!r}: expected one of {MODES}")
    if self.patience < 1 or self.min_delta < 0:
      raise ValueError(f"early_stop: patience={self.patience} must be >= 1 and "
                       f"min_delta={self.min_delta} >= 0")
    if not config.get("eval_every", 0):
      raise ValueError(f"early_stop.metric={self.metric!r} needs evaluations during "
                       f"training: set eval_every > 0")
    self.frozen: list[str] = []
    if plan is not None:
      self.frozen = [path_name(p) for p, on in
                     jax.tree_util.tree_flatten_with_path(plan.trainable)[0] if not on]
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(e.get("keep_best", 1)), best_fn=lambda m: m[self.metric],
        best_mode=self.mode, keep_checkpoints_without_metrics=False, create=True,
        enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(
        storage.as_path(workdir) / "checkpoints_best", options=options,
        item_handlers=dict(params=ocp.StandardCheckpointHandler(),
                           batch_stats=ocp.StandardCheckpointHandler()))
    self.best: float | None = None
    self.best_step: int | None = None
    self.bad = 0            # evaluations since the last improvement
    self.stopped = False

  def state_dict(self) -> dict:
    """What a train checkpoint records, so a resumed run goes on counting."""
    return dict(best=self.best, best_step=self.best_step, bad=self.bad, stopped=self.stopped)

  def load_state_dict(self, d: dict) -> None:
    self.best, self.best_step = d.get("best"), d.get("best_step")
    self.bad, self.stopped = int(d.get("bad", 0)), bool(d.get("stopped", False))

  def _improves(self, value: float) -> bool:
    if self.best is None:
      return True
    if self.mode == "max":
      return value > self.best + self.min_delta
    return value < self.best - self.min_delta

  def update(self, step: int, metrics: dict[str, float], params: Any,
             batch_stats: Any = None) -> bool:
    """Record an evaluation at `step` of `params` (and BatchNorm's `batch_stats`, kept
    with them: the best params normalise with their own statistics); True when
    training should stop now."""
    if self.metric not in metrics:
      raise KeyError(f"early_stop.metric={self.metric!r} is not among the evaluation's "
                     f"metrics: {sorted(metrics)}")
    value = float(metrics[self.metric])
    if self._improves(value):
      self.best, self.best_step, self.bad = value, step, 0
      items = dict(params=ocp.args.StandardSave(drop_params(params, self.frozen)))
      if batch_stats:
        items["batch_stats"] = ocp.args.StandardSave(batch_stats)
      self.manager.save(step, args=ocp.args.Composite(**items), metrics={self.metric: value})
      self.manager.wait_until_finished()
    else:
      self.bad += 1
    self.stopped = self.bad >= self.patience
    return self.stopped

  def final_params(self, params: Any, step: int, at_end: bool, batch_stats: Any = None
                   ) -> tuple[Any, Any] | None:
    """(params, batch_stats) of the best step to end the run with (`params` and
    `batch_stats` are those of `step`), or None when the run goes on (not stopped, not
    `at_end`) or `step` is itself the best."""
    if not (at_end or self.stopped) or self.best_step in (None, step):
      return None
    return self.best_params(params, batch_stats)

  def result(self) -> dict:
    return {"best_step": self.best_step, "early_stopped": self.stopped}

  def best_params(self, params: Any, batch_stats: Any = None) -> tuple[Any, Any]:
    """The best step's (params, batch_stats), in the structure and shardings of the
    current ones (which also supply the frozen leaves)."""
    step = self.manager.best_step()
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    items = dict(params=ocp.args.StandardRestore(abstract(drop_params(params, self.frozen))))
    if batch_stats:
      items["batch_stats"] = ocp.args.StandardRestore(abstract(batch_stats))
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    current = flat(params)
    best = fill_params(restored.params, {k: current[k] for k in self.frozen}, params)
    return best, (restored.batch_stats if batch_stats else batch_stats)

  def close(self) -> None:
    self.manager.close()
