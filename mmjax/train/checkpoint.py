"""Orbax checkpoints: train state + data-iterator position + config, together.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and
renames), so a crash or a NaN stop never leaves a half-written latest step.
Restoring takes the target's shardings, so a run may resume on another mesh.

A fine-tune that freezes params it loaded from a pretrained checkpoint (LoRA,
adapters, linear probe, partial) writes *delta* checkpoints: the frozen params
are left out and the data item records {"base": {"path", "step", "params"}},
the checkpoint they come from. Restoring reads them back from there, so a delta
checkpoint loads into the full model like any other.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

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


def drop_params(params: Any, names) -> Any:
  """`params` without the leaves named in `names` ("a/b/kernel"; emptied dicts go too)."""
  names = set(names)
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in names},
                                      sep="/")


def fill_params(saved: Any, base: dict[str, np.ndarray], like: Any = None) -> Any:
  """`saved` params with the leaves they lack taken from `base` ({name: array}); with
  `like` (the full params, arrays or ShapeDtypeStructs), in its structure, dtypes and
  shardings."""
  flat = dict(traverse_util.flatten_dict(saved, sep="/"))
  if like is None:
    flat.update({k: v for k, v in base.items() if k not in flat})
    return traverse_util.unflatten_dict(flat, sep="/")

  def pick(path, leaf):
    name = path_name(path)
    if name in flat:
      return flat[name]
    if isinstance(base[name], jax.Array):     # already on device (e.g. the live params)
      return base[name]
    value = np.asarray(base[name], leaf.dtype)
    sharding = getattr(leaf, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else value

  return jax.tree_util.tree_map_with_path(pick, like)


class Checkpointer:

  def __init__(self, workdir: str | pathlib.Path, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                    config=ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=handlers)
    # {"path", "step", "params": names}: frozen params left out of every save (delta).
    self.base: dict | None = None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None, config_json: str) -> None:
    data_state = dict(data_state or {})
    if self.base:
      state = state.replace(params=drop_params(state.params, self.base["params"]))
      data_state["base"] = self.base
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config_json))))

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restore onto `target`'s structure and shardings (arrays or ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    base = self.base_of(step)
    full = target
    if base:
      target = target.replace(params=drop_params(target.params, base["params"]))
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
    state = restored.state
    if base:
      state = state.replace(params=fill_params(state.params, self.base_params(step, base),
                                               full.params))
    return state, dict(restored.data or {}), step

  def base_of(self, step: int) -> dict | None:
    """The base pointer of a delta checkpoint, None for a full one."""
    data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
    return (data or {}).get("base")

  def config_of(self, step: int) -> ml_collections.ConfigDict:
    got = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(got.config)

  def base_params(self, step: int, base: dict) -> dict[str, np.ndarray]:
    from mmjax.tuning.init import base_params  # pylint: disable=g-import-not-at-top
    return base_params(base, self.config_of(step))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
