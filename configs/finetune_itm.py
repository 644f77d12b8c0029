"""Fine-tune image-text matching on `shapes`: does this caption describe this image?

The model is configs/demo.py's. ITM trains on each pair plus a hard negative each way,
sampled by the joint-space similarity (`MultimodalModel._itm`), so the contrastive loss
stays on at a small weight to keep those embeddings, and the negatives, meaningful.

  mmjax finetune --config configs/finetune_itm.py --init DEMO_WORKDIR --workdir DIR
  mmjax train --config configs/finetune_itm.py --workdir DIR                   # from scratch

arg "tiny": a seconds-long variant for tests.
"""
import ml_collections

from mmjax.config import base_config, parse_arg
from mmjax.config_blocks import TINY_TOWER, demo_towers, shapes_data
from mmjax.tuning.config import finetune_config, init_config


def get_config(arg=None):
  flags, _ = parse_arg(arg, {"tiny"}, where="configs/finetune_itm.py")
  c = base_config()
  c.total_steps = 500
  c.batch_size = 64
  c.log_every = 25
  c.checkpoint_every = 0
  c.keep_checkpoints = 1

  c.data = shapes_data()
  c.model = ml_collections.ConfigDict(dict(
      **demo_towers(), embed_dim=96, dtype="float32", dropout=0.0, drop_path=0.0))
  c.objectives = ml_collections.ConfigDict(dict(itm=1.0, contrastive=0.1))
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 50
  c.finetune = finetune_config(strategy="full")
  c.init = init_config(ignore=r"^mlm_head/")   # a demo trained with MLM has this head
  c.evals = ml_collections.ConfigDict(dict(
      itm=dict(type="itm", split="test"),
      retrieval=dict(type="retrieval", split="test")))

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
    c.model.embed_dim = 32
  return c
