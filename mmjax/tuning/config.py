"""Defaults of `config.finetune` and `config.init`; a fine-tune config starts from these.

  c.finetune = finetune_config(strategy="lora", lora_rank=8)
  c.init = init_config(path="workdirs/pretrained")
"""
from __future__ import annotations

import ml_collections

# Params a pretrained checkpoint is not expected to have: task heads and PEFT parts.
NEW_PARAMS = r"^classifier/|/lora_[ab]$|/adapter_(attn|mlp)/"


def finetune_config(**overrides) -> ml_collections.ConfigDict:
  c = dict(
      strategy="full",        # full | partial | per_modality | linear_probe | progressive | lora | adapters
      # partial
      freeze_towers=(),       # any of "image", "text", "fusion" (LiT: ("image",))
      freeze_bottom=0,        # k: embeddings and blocks 0..k-1 of every tower
      freeze_regex="",        # params whose path name matches
      # per_modality: this tower at modality_lr_scale x optim.lr, heads at 1x, rest frozen
      modality="image",
      modality_lr_scale=1.0,
      # progressive: heads first; one more block from the top every N steps
      unfreeze_every=100,
      unfreeze_depth=1,       # blocks per tower that end up training
      unfreeze_towers=(),     # default: every tower
      # lora / adapters (the model gets them whenever rank / dim > 0)
      lora_rank=0,
      lora_alpha=16.0,
      lora_targets=("query", "value"),   # of query, key, value, out, fc1, fc2
      adapter_dim=0,
      # with any strategy
      layer_decay=1.0,        # < 1: layer-wise lr decay, decay ** (layers above) per tower
      lr_groups=(),           # ((regex, lr scale), ...): the first match scales a param
      # checkpoints leave out frozen params loaded from init.path (a pointer instead)
      save_frozen=False,      # True: write every param anyway
      # quantization-aware training (mmjax/tuning/quantize_aware.py): weight "int8",
      # act "int8" or "" (weights only); both "" = off
      quantize=dict(weight="", act=""),
      # magnitude pruning (mmjax/tuning/prune.py): sparsity 0 = off; end_step 0 = last step
      prune=dict(sparsity=0.0, schedule="gradual", scope="global",
                 targets=r"/encoder/.*/kernel$", begin_step=0, end_step=0),
  )
  unknown = set(overrides) - set(c)
  if unknown:
    raise KeyError(f"finetune_config: unknown options {sorted(unknown)}")
  c.update(overrides)
  return ml_collections.ConfigDict(c)


def init_config(**overrides) -> ml_collections.ConfigDict:
  c = dict(
      path="",                # an mmjax workdir or a Hugging Face directory; "" = from scratch
      step=-1,                # workdir checkpoint step; -1 = latest
      new=NEW_PARAMS,         # regex: params that may be absent from the checkpoint
      ignore="",              # regex: checkpoint params (HF: tensor names) to leave unused
      lr=0.0,                 # > 0: optim.lr when starting from path (pretrained weights
                              # want a smaller rate than a run from scratch); 0: optim.lr
      towers=False,           # True: model towers + image size/text length/tokenizer from
                              # path; or the towers to take: ("image",)
  )
  unknown = set(overrides) - set(c)
  if unknown:
    raise KeyError(f"init_config: unknown options {sorted(unknown)}")
  c.update(overrides)
  return ml_collections.ConfigDict(c)
