"""Knowledge distillation on scikit-learn's digits: a larger ViT teacher trained on every
train label teaches a small ViT that only has a few labels (`data.train_examples`).

  mmjax train --config configs/distill_digits.py:teacher --workdir runs/teacher
  mmjax train --config configs/distill_digits.py:student --workdir runs/student
  mmjax train --config configs/distill_digits.py:distill --config.distill.teacher=runs/teacher \\
      --workdir runs/distilled

arg: comma-separated tokens
  teacher   the larger ViT on all of digits' train split (hard labels)
  student   the small ViT on a fixed seeded subset of STUDENT_EXAMPLES train examples
  distill   the same student and subset, its loss mixing the hard labels with the
            teacher's softened outputs (needs --config.distill.teacher=DIR)
  tiny      a seconds-long variant for tests
The `test` split (a held-out stratified 20%) is what every run reports.
"""
import ml_collections

from mmjax.config import ConfigError, base_config, parse_arg, tower
from mmjax.config_blocks import TINY_TOWER, digits_data

ROLES = ("teacher", "student", "distill")
STUDENT_EXAMPLES = 150       # the student's label budget, of 1437 train scans
TEMPERATURE = 4.0
DISTILL_WEIGHT = 0.7         # objectives: classify 1 - w, distill w


def _model(role: str) -> ml_collections.ConfigDict:
  if role == "teacher":
    image = tower(patch=4, width=96, depth=4, heads=4, mlp_dim=192, pool="gap")
  else:
    image = tower(patch=4, width=64, depth=2, heads=2, mlp_dim=128, pool="gap")
  return ml_collections.ConfigDict(dict(
      image=image, classifier=dict(input="image", num_classes=10), dtype="float32",
      dropout=0.0, drop_path=0.1 if role == "teacher" else 0.0))


def get_config(arg=None):
  tokens, _ = parse_arg(arg, {*ROLES, "tiny"}, where="configs/distill_digits.py")
  roles = [r for r in ROLES if r in tokens]
  if len(roles) != 1:
    raise ConfigError(f"configs/distill_digits.py: arg {arg!r} needs exactly one of "
                      f"{ROLES}, optionally with 'tiny'")
  role = roles[0]

  c = base_config()
  c.total_steps = 500 if role == "teacher" else 400
  c.batch_size = 64
  c.log_every = 50
  c.checkpoint_every = 0
  c.keep_checkpoints = 1
  c.data = digits_data(train_examples=0 if role == "teacher" else STUDENT_EXAMPLES)
  c.model = _model(role)
  c.objectives = ml_collections.ConfigDict(dict(classify=1.0))
  c.objective_options = ml_collections.ConfigDict(dict(
      classify=dict(label="label", label_smoothing=0.1)))
  if role == "distill":
    c.objectives = ml_collections.ConfigDict(dict(classify=1 - DISTILL_WEIGHT,
                                                  distill=DISTILL_WEIGHT))
    # One temperature for the teacher's soft targets and the loss (the loop passes it on).
    c.distill = ml_collections.ConfigDict(dict(teacher="", step=-1, temperature=TEMPERATURE))
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.05
  c.evals = ml_collections.ConfigDict(dict(
      report=dict(type="classification", split="test", label="label")))

  if "tiny" in tokens:
    c.total_steps = 4
    c.batch_size = 16
    c.eval_batch_size = 128
    c.log_every = 2
    c.optim.warmup_steps = 1
    c.data.train_examples = 0 if role == "teacher" else 48
    c.model.image.update(TINY_TOWER, depth=2 if role == "teacher" else 1, patch=8)
  return c
