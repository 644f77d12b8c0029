"""Start a fine-tune from a pretrained mmjax workdir or Hugging Face directory.

Strict: every param of the new model must come from the checkpoint unless it
matches `config.init.new` (task heads, LoRA, adapters), and every checkpoint
param must be used unless it matches `config.init.ignore`; anything else, and
any shape difference, fails with the full list of keys.
"""
from __future__ import annotations

import copy
import json
import logging
import pathlib
import re
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from mmjax.parallel import path_name
from mmjax.train.checkpoint import CheckpointMismatch, shapes_by_name, tree_mismatch

log = logging.getLogger("mmjax")


def checkpoint_params(path, config, *, step: int = -1, new: str = "",
                      ignore: str = "") -> tuple[dict[str, np.ndarray], int | None]:
  """({"a/b/kernel": array}, step) of an mmjax workdir (`step` -1 = latest) or an HF
  directory (step None), as params of the model `config` describes; params matching
  `new` are left out, and so are checkpoint params matching `ignore`."""
  path = pathlib.Path(path).expanduser()
  if (path / "checkpoints").is_dir():
    from mmjax.convert.workdir import read_workdir  # pylint: disable=g-import-not-at-top
    _, params, step = read_workdir(path, None if step < 0 else step)
    flat = traverse_util.flatten_dict(params, sep="/")
    skip = re.compile(ignore) if ignore else None
    return {k: np.asarray(v) for k, v in flat.items() if not (skip and skip.search(k))}, step
  if (path / "model.safetensors").is_file():
    from mmjax.convert.pretrained import load_params  # pylint: disable=g-import-not-at-top
    # The HF importer checks keys and shapes itself; params matching `new` come back
    # freshly initialised, and are dropped here so that this run's init is used.
    params = load_params(path, config, allow_missing=new, ignore=ignore)
    fresh = re.compile(new) if new else None
    flat = traverse_util.flatten_dict(params, sep="/")
    return {k: np.asarray(v) for k, v in flat.items() if not (fresh and fresh.search(k))}, None
  raise FileNotFoundError(f"init.path={str(path)!r} is neither an mmjax workdir (no "
                          f"checkpoints/) nor a Hugging Face directory (no model.safetensors)")


def base_params(base: dict, config) -> dict[str, np.ndarray]:
  """The params a delta checkpoint left out (`base["params"]`), read back from the
  checkpoint it points to (`base["path"]` at `base["step"]`)."""
  step = base.get("step")
  saved, _ = checkpoint_params(base["path"], config, step=-1 if step is None else step,
                               new=config.init.get("new", ""),
                               ignore=config.init.get("ignore", ""))
  missing = sorted(set(base["params"]) - set(saved))
  if missing:
    raise CheckpointMismatch(f"base checkpoint {base['path']} (step {step}) no longer has "
                             f"{len(missing)} params this fine-tune's checkpoint relies on, "
                             f"e.g. {missing[:5]}")
  return {k: saved[k] for k in base["params"]}


# What `init.towers` copies from the init checkpoint's config.
_MODEL_KEYS = ("image", "text", "fusion", "embed_dim")
_DATA_KEYS = ("image_size", "max_len", "mean", "std", "tokenizer", "vocab_size")


def towers_from_init(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """With `config.init.towers`, a copy of `config` whose towers (model.image / text /
  fusion, embed_dim) and the data fields they fix (image size, text length,
  normalisation, tokenizer) are the init checkpoint's, so a fine-tune config
  states only its head, strategy and data; otherwise `config` itself."""
  init = config.get("init")
  if not (init and init.get("path") and init.get("towers")):
    return config
  path = pathlib.Path(init.path).expanduser()
  if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
    source = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
  elif (path / "model.safetensors").is_file():
    from mmjax.convert.pretrained import pretrained_config  # pylint: disable=g-import-not-at-top
    source, _ = pretrained_config(path)
    if (path / "tokenizer.json").is_file():
      source.data.tokenizer = str(path / "tokenizer.json")
  else:
    raise FileNotFoundError(f"init.path={str(path)!r} is neither an mmjax workdir nor a "
                            f"Hugging Face directory (init.towers reads its config)")
  out = copy.deepcopy(config)
  with out.unlocked():
    for key in _MODEL_KEYS:
      if key in source.model and source.model[key]:
        out.model[key] = copy.deepcopy(source.model[key])
      elif key in out.model and key != "embed_dim":
        out.model[key] = None      # the pretrained model has no such tower
    if out.model.get("image") and out.model.image.get("num_classes"):
      out.model.image.num_classes = 0   # its own head; the task head is model.classifier
    for key in _DATA_KEYS:
      if key in source.data and source.data[key] not in ("", None):
        out.data[key] = source.data[key]
  log.info("init.towers: model towers %s from %s",
           [k for k in _MODEL_KEYS[:3] if out.model.get(k)], path)
  return out


def load_init(config, params: Any) -> tuple[Any, dict[str, Any]]:
  """`params` (this run's fresh init) with every leaf the checkpoint `config.init.path`
  holds; returns (params, info): info has "loaded" / "new" counts of leaves, and
  "base" = {"path", "step", "params": names loaded}, what a delta checkpoint points to."""
  init = config.init
  saved, step = checkpoint_params(init.path, config, step=init.get("step", -1), new=init.new,
                                  ignore=init.get("ignore", ""))
  log.info("init: %s%s", init.path, "" if step is None else f" step {step}")
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
  loaded = sorted(k for k in wanted if k in saved)
  info = {"loaded": len(loaded), "new": len(wanted) - len(loaded),
          "base": {"path": str(pathlib.Path(init.path).expanduser().absolute()), "step": step,
                   "params": loaded}}
  log.info("init: %d params loaded, %d new (%s)", info["loaded"], info["new"],
           ", ".join(sorted(k for k in wanted if k not in saved))[:300])
  return merged, info
