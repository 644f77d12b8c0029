"""Fine-tune an image classifier on scikit-learn's digits (8x8 scans upsampled to 32x32;
the `test` split is a held-out stratified 20%).

  mmjax finetune --config configs/finetune_digits.py:lora --init WORKDIR_OR_HF_DIR --workdir DIR

arg: comma-separated tokens
  a strategy name   full | partial | per_modality | linear_probe | progressive | lora |
                    adapters, with this file's defaults for its options
  tiny              a seconds-long variant for tests
  clip_pretrain     not a fine-tune: CLIP-style contrastive pretraining of the same image
                    tower (+ a 2-block text tower) on digits' train images and captions,
                    a base to fine-tune from (benchmarks/finetune_digits.py, the notebook)
  augment           RandAugment (2 ops, magnitude 9) on each image, and mixup/cutmix on
                    half the batches (no colour jitter: the digits are grey)
"""
import ml_collections

from mmjax.config import ConfigError, base_config, parse_arg, tower
from mmjax.config_blocks import TINY_TOWER, digits_data
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


CLIP_ONLY = r"^(text_tower|image_proj|text_proj|logit_scale|logit_bias)(/|$)"


def get_config(arg=None):
  tokens, _ = parse_arg(arg, {*STRATEGY_DEFAULTS, "tiny", "augment", "clip_pretrain"},
                       where="configs/finetune_digits.py")
  strategies = sorted(tokens & set(STRATEGY_DEFAULTS))
  if len(strategies) > 1:
    raise ConfigError(f"configs/finetune_digits.py: arg {arg!r} names {len(strategies)} "
                      f"strategies {strategies}; give at most one")
  strategy = strategies[0] if strategies else "full"

  c = base_config()
  c.total_steps = 600
  c.batch_size = 64
  c.log_every = 50
  c.checkpoint_every = 0
  c.keep_checkpoints = 1
  c.data = digits_data()
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
  # A clip_pretrain base has a text tower and projections the classifier does not use.
  c.init = init_config(ignore=CLIP_ONLY)
  c.evals = ml_collections.ConfigDict(dict(
      report=dict(type="classification", split="test", label="label")))

  if "clip_pretrain" in tokens:
    c.model.text = tower(width=64, depth=2, heads=2, mlp_dim=128, vocab_size=0)
    c.model.embed_dim = 64
    c.model.classifier = ml_collections.ConfigDict(dict(num_classes=0, input="image"))
    c.objectives = ml_collections.ConfigDict(dict(contrastive=1.0))
    c.objective_options = ml_collections.ConfigDict()
    c.evals = ml_collections.ConfigDict()
    del c["finetune"]
    del c["init"]

  if "augment" in tokens:
    c.data.augment.randaugment = dict(num_ops=2, magnitude=9)
    c.mix = ml_collections.ConfigDict(dict(mixup=0.2, cutmix=1.0, prob=0.5, switch_prob=0.5))

  if "tiny" in tokens:
    c.total_steps = 8
    c.batch_size = 16
    c.eval_batch_size = 128
    c.log_every = 4
    c.optim.warmup_steps = 2
    c.model.image.update(TINY_TOWER, depth=2, patch=8)
    if c.model.get("text"):
      c.model.text.update(TINY_TOWER)
      c.model.embed_dim = 32
  return c
