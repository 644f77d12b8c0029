"""Orbax checkpoints: train state + data-iterator position + config, together.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and
renames), so a crash or a NaN stop never leaves a half-written latest step, and
the temporary folders of an interrupted save are removed when the next run
opens the workdir. Restoring takes the target's shardings, so a run may resume
on another mesh, and its stack layout: a checkpoint of scanned blocks
(model.scan_layers) resumes an unrolled run and vice versa, optimizer state included
(mmjax/io/layers_layout.py). The workdir may be a URL (gs://bucket/run, mmjax/io/storage.py):
Orbax and TensorStore write the steps there directly.

A step that cannot be read (a truncated or corrupt file) is reported in one line
naming the step and the reason; `restore` then falls back to the newest step that
reads, and moves the bad one aside to <workdir>/checkpoints_unreadable/ rather
than deleting it (a resumed run would otherwise try to write that step again).

A fine-tune that freezes params it loaded from a pretrained checkpoint (LoRA,
adapters, linear probe, partial) writes *delta* checkpoints: the frozen params
are left out and the data item records {"base": {"path", "step", "params"}},
the checkpoint they come from. Restoring reads them back through `base_loader`
(`mmjax.io.loading.base_params`), so a delta checkpoint loads into the full model
like any other.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mmjax.io import layers_layout, storage
from mmjax.io.trees import CheckpointMismatch, drop_params, fill_params, shapes_by_name, \
    tree_mismatch

log = logging.getLogger("mmjax")

# (base pointer, the checkpoint's run config) -> {"a/b/kernel": array} of the frozen params.
BaseLoader = Callable[[dict, ml_collections.ConfigDict], dict[str, np.ndarray]]
UNREADABLE_DIR = "checkpoints_unreadable"


class UnreadableCheckpoint(ValueError):
  """A checkpoint step whose files cannot be read (truncated, corrupt, missing)."""


# What an abandoned read reports. Orbax runs each restore's coroutine in a fresh asyncio
# loop and closes the loop when the coroutine ends. When one array of a step fails to read,
# the coroutine ends at once and the step's other reads are abandoned; as they finish,
# TensorStore calls `call_soon_threadsafe` on the closed loop (a RuntimeError that Python
# prints as an unraisable exception) and asyncio logs the failed ones as "Future exception
# was never retrieved": a traceback per array on stderr, after the one-line warning that
# already named the step. `_quiet_abandoned_reads` drops exactly those.
_checkpoint_dirs: set[str] = set()
_quiet_lock = threading.Lock()


def _is_closed_loop_report(args) -> bool:
  """sys.unraisablehook's args: TensorStore posting to a closed event loop."""
  if args.exc_type is not RuntimeError or str(args.exc_value) != "Event loop is closed":
    return False
  tb = args.exc_traceback
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    tb = tb.tb_next
  return False


class _AbandonedReadFilter(logging.Filter):
  """asyncio's "exception was never retrieved" about a file in a checkpoint directory."""

  def filter(self, record: logging.LogRecord) -> bool:
    if "exception was never retrieved" not in str(record.msg) or not record.exc_info:
      return True
    text = str(record.exc_info[1])
    if any(d in text for d in _checkpoint_dirs):
      log.debug("dropped a report of a checkpoint read abandoned after a failed one")
      return False
    return True


def _quiet_abandoned_reads(directory: epath.Path) -> None:
  """Drop the reports of reads in `directory` that a failed read abandoned, counted in the
  debug log; every other report goes where it went before. Installed once per process."""
  with _quiet_lock:
    _checkpoint_dirs.add(str(directory).rstrip("/") + "/")
    previous = sys.unraisablehook
    if getattr(previous, "_mmjax_quiet", False):
      return

    def hook(args):
      if _is_closed_loop_report(args):
        log.debug("dropped a checkpoint read's report to its closed event loop")
      else:
        previous(args)

    hook._mmjax_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AbandonedReadFilter())


def _reason(e: BaseException) -> str:
  """The first line of an Orbax / TensorStore error, which can run to 140 lines."""
  text = str(e).strip().splitlines()
  first = text[0].split(" See full TensorStore details")[0][:300] if text else ""
  return f"{type(e).__name__}: {first}"


def _same_leaves(saved: Any, wanted: Any) -> bool:
  """Whether two trees hold the same array shapes (names may differ: Orbax stores optax's
  namedtuples as dicts and tuples as lists, so only the shapes are compared)."""
  return sorted(shapes_by_name(saved).values()) == sorted(shapes_by_name(wanted).values())


class Checkpointer:

  def __init__(self, workdir: str | epath.PathLike, keep: int, *, async_save: bool = True,
               base_loader: BaseLoader | None = None, read_only: bool = False):
    self.workdir = storage.as_path(workdir)     # a local folder or a URL (gs://...)
    self.directory = self.workdir / "checkpoints"
    _quiet_abandoned_reads(self.directory)
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only)
    handlers = dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                    config=ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=handlers)
    self.base_loader = base_loader
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

  # --- reading ------------------------------------------------------------------------

  def _steps(self, step: int | None) -> list[int]:
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step is not None and step not in self.manager.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} (steps: "
                              f"{sorted(self.manager.all_steps())})")
    return steps

  def _first_readable(self, step: int | None, read: Callable[[int], Any]) -> Any:
    """read(s) for the newest step s that reads (only `step` when given). A training
    restore moves unreadable steps aside; a read-only one leaves the workdir as it is."""
    steps = self._steps(step)
    for s in steps:
      try:
        return read(s)
      except UnreadableCheckpoint as e:
        if step is not None:
          raise
        if self.read_only:
          log.warning("%s; using the previous checkpoint", e)
        else:
          log.warning("%s; moved it to %s and resuming from the previous checkpoint", e,
                      self._set_aside(s))
    raise UnreadableCheckpoint(f"no readable checkpoint in {self.directory}: steps {steps} "
                               f"all failed to read (see the warnings above)")

  def _set_aside(self, step: int) -> epath.Path:
    """Move step `step` out of Orbax's sight (process 0 moves; every process waits)."""
    self.manager.wait_until_finished()
    target = self.workdir / UNREADABLE_DIR / str(step)
    if jax.process_index() == 0:
      if target.exists():
        target = target.with_name(f"{step}.{int(time.time())}")
      target.parent.mkdir(parents=True, exist_ok=True)
      storage.move(self.directory / str(step), target)
    multihost_utils.sync_global_devices(f"mmjax_set_aside_{step}")
    self.manager.reload()
    return target

  def _read_item(self, step: int, name: str) -> Any:
    try:
      got = self.manager.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.JsonRestore()}))
    except Exception as e:  # Orbax raises bare Exceptions for unreadable files.
      raise UnreadableCheckpoint(f"checkpoint {self.directory}/{step} is unreadable "
                                 f"({name}): {_reason(e)}") from e
    return got[name]

  def _state_metadata(self, step: int) -> Any:
    try:
      return self.manager.item_metadata(step)["state"]
    except Exception as e:  # a corrupt or missing _METADATA file: any error type
      raise UnreadableCheckpoint(f"checkpoint {self.directory}/{step} is unreadable "
                                 f"(metadata): {_reason(e)}") from e

  def _read_state(self, step: int, abstract: Any | None) -> Any:
    args = ocp.args.StandardRestore(abstract) if abstract is not None else \
        ocp.args.StandardRestore()
    try:
      return self.manager.restore(step, args=ocp.args.Composite(state=args)).state
    except Exception as e:  # TensorStore / Orbax read errors come as many types
      raise UnreadableCheckpoint(f"checkpoint {self.directory}/{step} is unreadable "
                                 f"(state): {_reason(e)}") from e

  def _base_params(self, step: int, base: dict) -> dict[str, np.ndarray]:
    if self.base_loader is None:
      raise ValueError(f"checkpoint {self.directory}/{step} is a delta of {base['path']}; "
                       f"this Checkpointer has no base_loader to read the frozen params")
    return self.base_loader(base, self.config_of(step))

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """(state, data state, step): the newest readable step (or `step`) restored onto
    `target`'s structure and shardings (arrays or ShapeDtypeStructs)."""
    return self._first_readable(step, lambda s: self._restore(target, s))

  def _restore(self, target: Any, step: int) -> tuple[Any, dict, int]:
    data = self.data_of(step)
    base = data.get("base")
    full = target
    saved = self._state_metadata(step)
    # The other stack layout (model.scan_layers): read in its own, then convert.
    stored = layers_layout.scanned_names(shapes_by_name(saved["params"]))
    relayout = stored is not None and layers_layout.is_scanned(target.params) not in (
        None, stored)
    if relayout:
      if base:
        raise CheckpointMismatch(
            f"checkpoint {self.directory}/{step} is a fine-tune delta written with "
            f"model.scan_layers={stored}: resume it with the same model.scan_layers")
      target = layers_layout.to_layout(target, stored, layers_layout.encoder_depths(full.params))
    if base:
      target = target.replace(params=drop_params(target.params, base["params"]))
    problems = tree_mismatch(shapes_by_name(saved["params"]), shapes_by_name(target.params))
    if problems:
      raise CheckpointMismatch(f"checkpoint {self.directory}/{step} does not fit this "
                               f"model's params:\n{problems}")
    if not _same_leaves(saved["opt_state"], target.opt_state):
      raise CheckpointMismatch(
          f"checkpoint {self.directory}/{step} has params that fit, but its optimizer state "
          f"({len(shapes_by_name(saved['opt_state']))} arrays) does not fit this run's "
          f"optimizer ({len(shapes_by_name(target.opt_state))} arrays): did optim.* or "
          f"finetune.* change since it was written?")
    stats = shapes_by_name(saved.get("batch_stats", {}))
    problems = tree_mismatch(stats, shapes_by_name(target.batch_stats))
    if problems:
      raise CheckpointMismatch(f"checkpoint {self.directory}/{step} has params that fit, but "
                               f"not this model's BatchNorm statistics:\n{problems}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    fields = [f.name for f in dataclasses.fields(target)]
    if all(name in saved for name in fields):
      state = self._read_state(step, abstract)
    else:   # written before the state held BatchNorm statistics or pruning masks: the
      # run has none, and the target's {} stands
      fields = [name for name in fields if name in saved]
      state = target.replace(**self._read_state(step, {k: getattr(abstract, k) for k in fields}))
    if base:
      state = state.replace(params=fill_params(state.params, self._base_params(step, base),
                                               full.params))
    if relayout:
      state = layers_layout.onto(state, full)
    return state, data, step

  def read_params(self, step: int | None = None) -> tuple[dict, int]:
    """(params as saved, step); see `read_variables`."""
    params, _, step = self.read_variables(step)
    return params, step

  def read_variables(self, step: int | None = None) -> tuple[dict, dict, int]:
    """(params, BatchNorm statistics ({} when none), step) as saved, without a target:
    no model, optimizer or tokenizer is built. Delta checkpoints come back whole, read
    through `base_loader`."""
    def read(s):
      data = self.data_of(s)
      # Onto host numpy arrays, not the shardings the writer had: those may name devices
      # this process does not address (every process of a multi-host eval reads it all).
      on_host = jax.tree.map(lambda m: np.empty(m.shape, m.dtype)
                             if hasattr(m, "shape") and hasattr(m, "dtype") else m,
                             self._state_metadata(s))
      state = self._read_state(s, on_host)
      params = state["params"]
      if data.get("base"):
        params = fill_params(params, self._base_params(s, data["base"]))
      return params, state.get("batch_stats") or {}, s
    return self._first_readable(step, read)

  def data_of(self, step: int) -> dict:
    """The data item of `step`: iterator position, early-stop counters, delta base."""
    return dict(self._read_item(step, "data") or {})

  def config_of(self, step: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(self._read_item(step, "config"))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
