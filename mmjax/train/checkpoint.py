"""Orbax checkpoints: train state + data-iterator position + config, together.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and
renames), so a crash or a NaN stop never leaves a half-written latest step.
Restoring takes the target's shardings, so a run may resume on another mesh.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
  pass


class Checkpointer:

  def __init__(self, workdir: str | pathlib.Path, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None, config_json: str) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        config=ocp.args.JsonSave(json.loads(config_json))))

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restore onto `target`'s structure and shardings (arrays or ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatch(
          f"checkpoint {self.directory}/{step} does not fit this model: {e}") from e
    return restored.state, dict(restored.data or {}), step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
