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

from mmjax.config import base_config, parse_arg
from mmjax.config_blocks import TINY_TOWER, demo_towers, shapes_data
from mmjax.data.shapes import ANSWERS
from mmjax.tuning.config import finetune_config, init_config


def get_config(arg=None):
  flags, _ = parse_arg(arg, {"tiny"}, where="configs/finetune_vqa.py")
  c = base_config()
  c.total_steps = 1500
  c.batch_size = 64
  c.log_every = 50
  c.checkpoint_every = 0
  c.keep_checkpoints = 1

  c.data = shapes_data(text_field="question")
  c.model = ml_collections.ConfigDict(dict(
      **demo_towers(), classifier=dict(input="fusion", num_classes=len(ANSWERS)),
      dtype="float32", dropout=0.0, drop_path=0.0))
  c.objectives = ml_collections.ConfigDict(dict(classify=1.0))
  c.objective_options = ml_collections.ConfigDict(dict(
      classify=dict(label="answer_id", label_smoothing=0.0)))
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.finetune = finetune_config(strategy="full")
  c.init = init_config(ignore=r"^(image_proj|text_proj|itm_head|mlm_head)/|^logit_(scale|bias)$")
  c.evals = ml_collections.ConfigDict(dict(
      vqa=dict(type="classification", split="test", label="answer_id")))

  if "tiny" in flags:
    c.total_steps = 20
    c.batch_size = 16
    c.eval_batch_size = 64
    c.log_every = 10
    c.optim.warmup_steps = 2
    c.data.train_size = 512
    c.data.eval_size = 64
    for t in (c.model.image, c.model.text, c.model.fusion):
      t.update(TINY_TOWER)
  return c
