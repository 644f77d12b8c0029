"""SigLIP ViT-B/16 at 224 px with a B text tower, trained from scratch at batch 32,768.

  mmjax train --config configs/siglip_b16.py --workdir gs://my-bucket/runs/siglip_b16 \
      --config.data.shards='gs://my-bucket/laion400m/{00000..41407}.tar' \
      --config.data.tokenizer=/path/to/hf-tokenizer --config.distributed.auto=True

Args (comma-separated, e.g. `configs/siglip_b16.py:data=tfds,remat=full`):
  data=webdataset|tfds  img2dataset tar shards (data.shards), or a prepared TFDS dataset
                        (data.tfds_name, data.data_dir; captions in data.text_key)
  remat=none|full|dots_saveable|...   what backprop keeps of each block (model.remat)
  scan=True|False       the blocks as one nn.scan (fast compile) or unrolled
  smoke                 the same model at batch 8 for 2 steps on built-in shapes at 224 px:
                        a CPU check that the config builds, compiles and steps

Recipe: SigLIP (Zhai et al. 2023, arXiv 2303.15343, and big_vision's SigLIP configs):
sigmoid loss at batch 32,768; Adam beta2 0.95 (stable at large batch); lr 1e-3 and
weight decay 1e-4 in big_vision's convention (decay x schedule, not x lr), which is
optax adamw's weight_decay = 1e-4 / 1e-3 = 0.1; cosine decay after a linear warmup;
logit scale init log(10) and bias init -10; 64 text tokens; image and text width 768,
so the embeddings are 768-d. Steps: 3B examples seen = 91,553 at 32k (ours; the paper
also trains longer) with 3% of them warmup (2,747), as big_vision's schedules do. The
image tower pools its CLS token (big_vision's SigLIP uses a MAP head, which mmjax's ViT
does not have). Set data.tokenizer to a Hugging Face tokenizer: without one, WordPiece
would be trained on every caption of every shard.
"""
import math

import ml_collections

from mmjax.config import ConfigError, base_config, data_block, parse_arg, tower
from mmjax.config_blocks import shapes_data

ARGS = dict(data="webdataset", remat="none", scan=True)


def get_config(arg=None):
  flags, args = parse_arg(arg, {"smoke"}, ARGS, where="configs/siglip_b16.py")
  c = base_config()
  c.batch_size = 32_768
  c.total_steps = 91_553
  c.log_every = 100
  c.checkpoint_every = 1000
  c.optim.update(dict(name="adamw", lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                      schedule="cosine", warmup_steps=2747, end_lr_factor=0.0, clip_norm=1.0))
  image = dict(image_size=224, max_len=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
               augment=dict(crop_scale=(1.0, 1.0), flip=False), vocab_size=32_000)
  if args["data"] == "webdataset":
    c.data = data_block("webdataset", shards="", shuffle_buffer=10_000, num_workers=8, **image)
  elif args["data"] == "tfds":
    c.data = data_block("tfds", tfds_name="", text_key="caption", label_key="",
                        num_workers=8, **image)
  else:
    raise ConfigError(f"configs/siglip_b16.py: data={args['data']!r}: expected webdataset or tfds")
  c.model = ml_collections.ConfigDict(dict(
      image=tower(variant="B/16"), text=tower(variant="B", pool="eos", vocab_size=0),
      embed_dim=768, dtype="bfloat16", dropout=0.0, drop_path=0.0,
      logit_scale_init=math.log(10.0), logit_bias_init=-10.0,
      scan_layers=args["scan"], remat=args["remat"]))
  c.objectives = ml_collections.ConfigDict(dict(sigmoid=1.0))
  # Each device holds its [local, local] logit blocks only, passing text embeddings around
  # the ring (mmjax/chunked_losses.py).
  c.objective_options = ml_collections.ConfigDict(dict(sigmoid=dict(chunked=True)))
  c.evals = ml_collections.ConfigDict()     # add retrieval on data.eval_shards, zero-shot, ...

  if "smoke" in flags:
    c.batch_size, c.total_steps, c.log_every = 8, 2, 1
    c.checkpoint_every, c.optim.warmup_steps = 0, 1
    c.data = shapes_data(image_size=224, max_len=64, train_size=64, eval_size=16)
  return c
