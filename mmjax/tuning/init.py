"""Start a fine-tune from a pretrained mmjax workdir or Hugging Face directory.

Strict: every param of the new model must come from the checkpoint unless it
matches `config.init.new` (task heads, LoRA, adapters), and every checkpoint
param must be used unless it matches `config.init.ignore`; anything else, and
any shape difference, fails with the full list of keys.
"""
from __future__ import annotations

import copy
import logging
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax import io
from mmjax.io.loading import tokenizer_path
from mmjax.io.trees import CheckpointMismatch, flat, path_name, shapes_by_name, tree_mismatch

log = logging.getLogger("mmjax")

# What `init.towers` copies from the init checkpoint's config.
_MODEL_KEYS = ("image", "text", "fusion", "embed_dim")
_DATA_KEYS = ("image_size", "max_len", "mean", "std", "tokenizer", "vocab_size")


def towers_from_init(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with `optim.lr = init.lr` when it starts from `init.path` and sets one, and
  with `config.init.towers`, a copy of `config` whose towers (model.image / text /
  fusion, embed_dim) and the data fields they fix (image size, text length,
  normalisation, tokenizer) are the init checkpoint's, so a fine-tune config
  states only its head, strategy and data; otherwise `config` itself."""
  init = config.get("init")
  if init and init.get("path") and init.get("lr", 0):
    config = copy.deepcopy(config)
    with config.unlocked():
      config.optim.lr = init.lr
  if not (init and init.get("path") and init.get("towers")):
    return config
  wanted = _MODEL_KEYS[:3] if init.towers is True else tuple(init.towers)
  unknown = sorted(set(wanted) - set(_MODEL_KEYS[:3]))
  if unknown:
    raise ValueError(f"init.towers={tuple(init.towers)!r}: {unknown[0]!r} is not a tower; "
                     f"expected True or some of {_MODEL_KEYS[:3]}")
  loaded = io.load(init.path, params=False, what="init.path")
  source = loaded.config
  source.data.tokenizer = tokenizer_path(loaded.path, source)
  out = copy.deepcopy(config)
  with out.unlocked():
    # Some towers only: not the joint-space size either (the projections need both).
    for key in _MODEL_KEYS if init.towers is True else wanted:
      if key in source.model and source.model[key]:
        out.model[key] = copy.deepcopy(source.model[key])
      elif key in out.model and key != "embed_dim":
        out.model[key] = None      # the pretrained model has no such tower
    if out.model.get("image") and out.model.image.get("num_classes"):
      out.model.image.num_classes = 0   # its own head; the task head is model.classifier
    for key in _DATA_KEYS:
      if key in source.data and source.data[key] not in ("", None):
        out.data[key] = source.data[key]
    if out.model.get("text") and source.data.get("max_len"):
      # The position table stays the checkpoint's; batches may be shorter (a classifier
      # of short texts need not pad to MiniLM's 256).
      out.model.text.max_len = source.model.text.get("max_len", 0) or source.data.max_len
      out.data.max_len = min(config.data.max_len, source.data.max_len)
  log.info("init.towers: model towers %s from %s",
           [k for k in wanted if out.model.get(k)], loaded.path)
  return out


def load_init(config, params: Any, batch_stats: Any = None) -> tuple[Any, Any, dict[str, Any]]:
  """`params` and `batch_stats` (this run's fresh init) with every leaf the checkpoint
  `config.init.path` holds; returns (params, batch_stats, info): info has "loaded" /
  "new" counts of params, and "base" = {"path", "step", "params": names loaded}, what
  a delta checkpoint points to. A BatchNorm whose params are loaded must come with its
  running statistics."""
  init = config.init
  step = init.get("step", -1)
  loaded = io.load(init.path, None if step < 0 else step, config=config, new=init.new,
                   ignore=init.get("ignore", ""), what="init.path")
  saved = {k: np.asarray(v) for k, v in flat(loaded.params).items()}
  log.info("init: %s%s", loaded.path, "" if loaded.step is None else f" step {loaded.step}")
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
  stats = _init_stats(loaded, batch_stats or {}, saved)
  loaded_names = sorted(k for k in wanted if k in saved)
  info = {"loaded": len(loaded_names), "new": len(wanted) - len(loaded_names),
          "base": {"path": str(loaded.path), "step": loaded.step, "params": loaded_names}}
  log.info("init: %d params loaded, %d new (%s)", info["loaded"], info["new"],
           ", ".join(sorted(k for k in wanted if k not in saved))[:300])
  return merged, stats, info


def _init_stats(loaded, batch_stats: Any, params: dict[str, np.ndarray]) -> Any:
  """`batch_stats` with the checkpoint's statistics of every norm whose params are in
  `params` (the checkpoint's, by name)."""
  required = {k: s for k, s in shapes_by_name(batch_stats).items()
              if f"{k.rpartition('/')[0]}/scale" in params}
  saved = {k: np.asarray(v) for k, v in flat(loaded.batch_stats).items() if k in required}
  problems = tree_mismatch({k: tuple(v.shape) for k, v in saved.items()}, required)
  if problems:
    raise CheckpointMismatch(f"init {loaded.path}: its BatchNorm statistics do not fit this "
                             f"model:\n{problems}")

  def pick(path, fresh):
    name = path_name(path)
    return np.asarray(saved[name], fresh.dtype) if name in saved else fresh

  return jax.tree_util.tree_map_with_path(pick, batch_stats)
