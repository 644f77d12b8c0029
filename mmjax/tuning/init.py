"""Start a fine-tune from a pretrained mmjax workdir or Hugging Face directory.

Strict: every param of the new model must come from the checkpoint unless it
matches `config.init.new` (task heads, LoRA, adapters), and every checkpoint
param must be used unless it matches `config.init.ignore`; anything else, and
any shape difference, fails with the full list of keys.
"""
from __future__ import annotations

import logging
import pathlib
import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from mmjax.parallel import path_name
from mmjax.train.checkpoint import CheckpointMismatch, shapes_by_name, tree_mismatch

log = logging.getLogger("mmjax")


def _checkpoint_params(init, config) -> dict[str, np.ndarray]:
  """{"a/b/kernel": array} from a workdir or an HF directory."""
  path = pathlib.Path(init.path).expanduser()
  if (path / "checkpoints").is_dir():
    from mmjax.convert.workdir import read_workdir  # pylint: disable=g-import-not-at-top
    step = init.get("step", -1)
    _, params, step = read_workdir(path, None if step < 0 else step)
    log.info("init: %s step %d", path, step)
    flat = traverse_util.flatten_dict(params, sep="/")
    ignore = re.compile(init.ignore) if init.get("ignore") else None
    return {k: np.asarray(v) for k, v in flat.items() if not (ignore and ignore.search(k))}
  if (path / "model.safetensors").is_file():
    from mmjax.convert.pretrained import load_params  # pylint: disable=g-import-not-at-top
    # The HF importer checks keys and shapes itself; params matching `new` come back
    # freshly initialised, and are dropped here so that this run's init is used.
    params = load_params(path, config, allow_missing=init.new, ignore=init.get("ignore", ""))
    new = re.compile(init.new) if init.new else None
    flat = traverse_util.flatten_dict(params, sep="/")
    return {k: np.asarray(v) for k, v in flat.items() if not (new and new.search(k))}
  raise FileNotFoundError(f"init.path={str(path)!r} is neither an mmjax workdir (no "
                          f"checkpoints/) nor a Hugging Face directory (no model.safetensors)")


def load_init(config, params: Any) -> tuple[Any, dict[str, int]]:
  """`params` (this run's fresh init) with every leaf the checkpoint `config.init.path`
  holds; returns (params, {"loaded": n, "new": m} counts of leaves)."""
  init = config.init
  saved = _checkpoint_params(init, config)
  wanted = shapes_by_name(params)
  new = re.compile(init.new) if init.new else None
  required = {k: s for k, s in wanted.items() if k in saved or not (new and new.search(k))}
  problems = tree_mismatch({k: tuple(v.shape) for k, v in saved.items()}, required)
  if problems:
    raise CheckpointMismatch(
        f"init {init.path} does not fit this model:\n{problems}\n"
        f"(init.new={init.new!r} lists params that may be new; init.ignore="
        f"{init.get('ignore', '')!r} lists checkpoint params to leave out)")

  def pick(path, fresh):
    name = path_name(path)
    return np.asarray(saved[name], fresh.dtype) if name in saved else fresh

  merged = jax.tree_util.tree_map_with_path(pick, params)
  counts = {"loaded": sum(k in saved for k in wanted), "new": sum(k not in saved for k in wanted)}
  log.info("init: %d params loaded, %d new (%s)", counts["loaded"], counts["new"],
           ", ".join(sorted(k for k in wanted if k not in saved))[:300])
  return merged, counts
