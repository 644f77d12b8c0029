"""Fine-tune image-text matching on `shapes`: does this caption describe this image?

The model is configs/demo.py's. ITM trains on each pair plus a hard negative each way,
sampled by the joint-space similarity (`MultimodalModel._itm`), so the contrastive loss
stays on at a small weight to keep those embeddings, and the negatives, meaningful.

  mmjax finetune --config configs/finetune_itm.py --init DEMO_WORKDIR --workdir DIR
  mmjax train --config configs/finetune_itm.py --workdir DIR                   # from scratch

arg "tiny": a seconds-long variant for tests.
"""
import ml_collections

from mmjax.config import base_config, tower
from mmjax.tuning.config import finetune_config, init_config


def get_config(arg=None):
  c = base_config()
  c.total_steps = 500
  c.batch_size = 64
  c.log_every = 25
  c.checkpoint_every = 0
  c.keep_checkpoints = 1

  c.data = ml_collections.ConfigDict(dict(
      name="shapes", image_size=32, max_len=16, seed=0, num_workers=0,
      train_size=50_000, eval_size=1024, num_objects=(1, 3),
      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
      augment=dict(crop_scale=(1.0, 1.0), flip=False),   # no flip: captions say "left of"
      tokenizer="", vocab_size=256, cache_dir=""))
  size = dict(width=96, depth=3, heads=4, mlp_dim=192)
  c.model = ml_collections.ConfigDict(dict(
      image=tower(patch=4, **size), text=tower(vocab_size=0, **dict(size, depth=2)),
      fusion=tower(mode="cross", **dict(size, depth=1)), embed_dim=96, dtype="float32",
      dropout=0.0, drop_path=0.0))
  c.objectives = ml_collections.ConfigDict(dict(itm=1.0, contrastive=0.1))
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 50
  c.finetune = finetune_config(strategy="full")
  c.init = init_config(ignore=r"^mlm_head/")   # a demo trained with MLM has this head
  c.evals = ml_collections.ConfigDict(dict(
      itm=dict(type="itm", split="test"),
      retrieval=dict(type="retrieval", split="test")))

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
    c.model.embed_dim = 32
  elif arg:
    raise ValueError(f"configs/finetune_itm.py: unknown arg {arg!r} (known: 'tiny')")
  return c
