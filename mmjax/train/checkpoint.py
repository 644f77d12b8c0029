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

from mmjax.parallel import path_name


class CheckpointMismatch(ValueError):
  pass


def shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
  """{"a/b/kernel": shape} for every array (or array metadata) leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_name(p): tuple(leaf.shape) for p, leaf in leaves}


def tree_mismatch(saved: dict[str, tuple], wanted: dict[str, tuple], limit: int = 20) -> str:
  """A readable list of missing, unexpected and mis-shaped keys ('' if none)."""
  missing = sorted(set(wanted) - set(saved))
  unexpected = sorted(set(saved) - set(wanted))
  shaped = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
  parts = []
  for title, keys, fmt in (
      ("missing (in the model, not the checkpoint)", missing, lambda k: k),
      ("unexpected (in the checkpoint, not the model)", unexpected, lambda k: k),
      ("mis-shaped", shaped, lambda k: f"{k}: checkpoint {saved[k]} vs model {wanted[k]}")):
    if keys:
      more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
      parts.append(f"  {title}: {len(keys)}\n" +
                   "\n".join(f"    {fmt(k)}" for k in keys[:limit]) + more)
  return "\n".join(parts)


class Checkpointer:

  def __init__(self, workdir: str | pathlib.Path, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                    config=ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=handlers)

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
    saved = self.manager.item_metadata(step)["state"]
    problems = tree_mismatch(shapes_by_name(saved["params"]), shapes_by_name(target.params))
    if problems:
      raise CheckpointMismatch(f"checkpoint {self.directory}/{step} does not fit this "
                               f"model's params:\n{problems}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      # Params matched above, so the optimizer state differs: optim.* changed.
      raise CheckpointMismatch(
          f"checkpoint {self.directory}/{step} has params that fit, but its optimizer "
          f"state does not fit this run's optimizer (did optim.* change since it was "
          f"written?): {e}") from e
    return restored.state, dict(restored.data or {}), step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
