"""Fine-tuning: strategies as trainable masks, init from pretrained, distillation.

  config.finetune = finetune_config(strategy="partial", freeze_towers=("image",))
  mmjax.finetune(config, workdir, init="workdirs/pretrained")   # or an HF directory

Everything runs in the one train loop (`mmjax.train`); see strategies.py.
"""
from mmjax.models.lora import merge_lora
from mmjax.tuning.config import NEW_PARAMS, finetune_config, init_config
from mmjax.tuning.prune import Pruner
from mmjax.tuning.quantize_aware import qat_model
from mmjax.tuning.strategies import STRATEGIES, Plan, make_plan

__all__ = ["NEW_PARAMS", "STRATEGIES", "Plan", "Pruner", "finetune_config", "init_config",
           "make_plan", "merge_lora", "qat_model"]
