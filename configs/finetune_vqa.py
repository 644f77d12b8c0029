"""Answer questions about `shapes` images ("what colour is the circle?", "how many shapes
are there?") as classification over the fixed answer set: the fusion tower's first
token, where the question attends to the image, feeds a classifier over ANSWERS.

  mmjax train --config configs/finetune_vqa.py --workdir DIR                   # from scratch
  mmjax finetune --config configs/finetune_vqa.py --init DEMO_WORKDIR --workdir DIR

The towers and data settings are configs/demo.py's, so a demo workdir fits; its joint-
space projections and ITM head have no use here (`init.ignore`).

arg "tiny": a seconds-long variant for tests.
"""
import ml_collections

from mmjax.config import base_config, tower
from mmjax.data.shapes import ANSWERS
from mmjax.tuning.config import finetune_config, init_config


def get_config(arg=None):
  c = base_config()
  c.total_steps = 1500
  c.batch_size = 64
  c.log_every = 50
  c.checkpoint_every = 0
  c.keep_checkpoints = 1

  c.data = ml_collections.ConfigDict(dict(
      name="shapes", image_size=32, max_len=16, seed=0, num_workers=0,
      train_size=50_000, eval_size=1024, num_objects=(1, 3),
      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
      augment=dict(crop_scale=(1.0, 1.0), flip=False),   # no crop: it could cut off a shape
      tokenizer="", vocab_size=256, cache_dir="",
      text_field="question"))
  size = dict(width=96, depth=3, heads=4, mlp_dim=192)
  c.model = ml_collections.ConfigDict(dict(
      image=tower(patch=4, **size), text=tower(vocab_size=0, **dict(size, depth=2)),
      fusion=tower(mode="cross", **dict(size, depth=1)),
      classifier=dict(input="fusion", num_classes=len(ANSWERS)), dtype="float32",
      dropout=0.0, drop_path=0.0))
  c.objectives = ml_collections.ConfigDict(dict(classify=1.0))
  c.objective_options = ml_collections.ConfigDict(dict(
      classify=dict(label="answer_id", label_smoothing=0.0)))
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.finetune = finetune_config(strategy="full")
  c.init = init_config(ignore=r"^(image_proj|text_proj|itm_head|mlm_head)/|^logit_(scale|bias)$")
  c.evals = ml_collections.ConfigDict(dict(
      vqa=dict(type="classification", split="test", label="answer_id")))

  if arg == "tiny":
    c.total_steps = 20
    c.batch_size = 16
    c.eval_batch_size = 64
    c.log_every = 10
    c.optim.warmup_steps = 2
    c.data.train_size = 512
    c.data.eval_size = 64
    for t in (c.model.image, c.model.text, c.model.fusion):
      t.update(width=32, depth=1, heads=2, mlp_dim=64)
  elif arg:
    raise ValueError(f"configs/finetune_vqa.py: unknown arg {arg!r} (known: 'tiny')")
  return c
