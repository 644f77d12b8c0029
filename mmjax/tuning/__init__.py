"""Fine-tuning: strategies as trainable masks, init from pretrained, LoRA merge.

  config.finetune = finetune_config(strategy="partial", freeze_towers=("image",))
  mmjax.finetune(config, workdir, init="workdirs/pretrained")   # or an HF directory

Everything runs in the one train loop (`mmjax.train`); see strategies.py.
"""
from __future__ import annotations

import copy
import pathlib

import ml_collections

from mmjax.tuning.config import NEW_PARAMS, finetune_config, init_config
from mmjax.tuning.lora import merge_lora
from mmjax.tuning.strategies import STRATEGIES, Plan, make_plan

__all__ = ["NEW_PARAMS", "STRATEGIES", "Plan", "finetune", "finetune_config", "init_config",
           "make_plan", "merge_lora"]


def finetune(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
             init: str | None = None, progress: bool = True) -> dict[str, float]:
  """`mmjax.train` of `config`, starting from the checkpoint `init` (an mmjax workdir or a
  HF directory; default `config.init.path`). Resuming `workdir` ignores `init`."""
  from mmjax.train.loop import train  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(config)
  with config.unlocked():
    if "finetune" not in config:
      config.finetune = finetune_config()
    if "init" not in config:
      config.init = init_config()
    if init is not None:
      config.init.path = str(init)
  return train(config, workdir, progress=progress)
