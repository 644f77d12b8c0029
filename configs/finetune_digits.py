"""Fine-tune an image classifier on scikit-learn's digits (8x8 scans upsampled to 32x32;
the `test` split is a held-out stratified 20%).

  mmjax finetune --config configs/finetune_digits.py:lora --init WORKDIR_OR_HF_DIR --workdir DIR

arg: comma-separated tokens
  a strategy name   full | partial | per_modality | linear_probe | progressive | lora |
                    adapters, with this file's defaults for its options
  tiny              a seconds-long variant for tests
"""
import ml_collections

from mmjax.config import base_config, tower
from mmjax.tuning.config import finetune_config, init_config

STRATEGY_DEFAULTS = {
    "full": {},
    "partial": dict(freeze_bottom=2),
    "per_modality": dict(modality="image", modality_lr_scale=0.3),
    "linear_probe": {},
    "progressive": dict(unfreeze_every=100, unfreeze_depth=4),
    "lora": dict(lora_rank=8, lora_alpha=16.0, lora_targets=("query", "value", "fc1", "fc2")),
    "adapters": dict(adapter_dim=32),
}


def get_config(arg=None):
  tokens = [t for t in (arg or "").split(",") if t]
  unknown = set(tokens) - set(STRATEGY_DEFAULTS) - {"tiny"}
  if unknown:
    raise ValueError(f"configs/finetune_digits.py: unknown arg {sorted(unknown)}; known: "
                     f"{sorted(STRATEGY_DEFAULTS)} and 'tiny'")
  strategy = next((t for t in tokens if t in STRATEGY_DEFAULTS), "full")

  c = base_config()
  c.total_steps = 600
  c.batch_size = 64
  c.log_every = 50
  c.checkpoint_every = 0
  c.keep_checkpoints = 1
  c.data = ml_collections.ConfigDict(dict(
      name="digits", image_size=32, max_len=16, seed=0, num_workers=0,
      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
      augment=dict(crop_scale=(0.8, 1.0), flip=False),   # no flip: digits have a handedness
      tokenizer="", vocab_size=256, cache_dir=""))
  c.model = ml_collections.ConfigDict(dict(
      image=tower(patch=4, width=96, depth=4, heads=4, mlp_dim=192, pool="gap"),
      classifier=dict(input="image", num_classes=10), dtype="float32",
      dropout=0.0, drop_path=0.1))
  c.objectives = ml_collections.ConfigDict(dict(classify=1.0))
  c.objective_options = ml_collections.ConfigDict(dict(
      classify=dict(label="label", label_smoothing=0.1)))
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.05
  c.finetune = finetune_config(strategy=strategy, **STRATEGY_DEFAULTS[strategy])
  c.init = init_config()
  c.evals = ml_collections.ConfigDict(dict(
      report=dict(type="classification", split="test", label="label")))

  if "tiny" in tokens:
    c.total_steps = 8
    c.batch_size = 16
    c.eval_batch_size = 128
    c.log_every = 4
    c.optim.warmup_steps = 2
    c.model.image.update(width=32, depth=2, heads=2, mlp_dim=64)
    c.model.image.patch = 8
  return c
