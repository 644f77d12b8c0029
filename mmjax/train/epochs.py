"""Run lengths in epochs: `config.epochs` and the `*_epochs` intervals, turned into steps
once the train split's size is known.

A user with their own folder thinks in passes over it ("30 epochs, warm up for 1"),
the loop in steps. Each length may be given either way; the epoch form wins when it is
> 0 and sets the step form, so everything downstream (schedule, checkpoints, early
stopping, the saved config.json) reads steps only:

  epochs                   -> total_steps       ceil(epochs * examples / batch_size)
  optim.warmup_epochs      -> optim.warmup_steps
  eval_every_epochs        -> eval_every        (>= 1 step)
  checkpoint_every_epochs  -> checkpoint_every  (>= 1 step)
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import ml_collections

# epoch key -> the step key it sets (dotted, from the config root).
EPOCH_KEYS = {
    "epochs": "total_steps",
    "optim.warmup_epochs": "optim.warmup_steps",
    "eval_every_epochs": "eval_every",
    "checkpoint_every_epochs": "checkpoint_every",
}


def _get(config, key: str, default=0.0):
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return default
    node = node[part]
  return node


def resolve(config: ml_collections.ConfigDict, examples: Callable[[], int]
            ) -> ml_collections.ConfigDict:
  """`config` with every `*_epochs` length > 0 turned into its step key, for a train
  split of `examples()` examples (called only then: it may read the split); `config`
  itself when it gives none."""
  given = {k: float(_get(config, k)) for k in EPOCH_KEYS if _get(config, k)}
  if not given:
    return config
  # Fractional: `epochs * per_epoch` stays exact although each pass drops its last
  # partial batch (the pipeline's repeat runs on, so no example is lost for good).
  per_epoch = examples() / config.batch_size
  config = copy.deepcopy(config)
  with config.unlocked():
    for key, epochs in given.items():
      steps = math.ceil(epochs * per_epoch - 1e-9)
      if key != "optim.warmup_epochs":
        steps = max(steps, 1)
      parent, _, leaf = EPOCH_KEYS[key].rpartition(".")
      (config[parent] if parent else config)[leaf] = steps
  return config


def epoch_of(step: int, config, examples: int) -> float:
  """How many passes over the train split `step` steps make."""
  return step * config.batch_size / max(examples, 1)
