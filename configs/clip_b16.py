"""CLIP ViT-B/16 at 224 px with a B text tower, trained from scratch at batch 32,768.

  mmjax train --config configs/clip_b16.py --workdir gs://my-bucket/runs/clip_b16 \
      --config.data.shards='gs://my-bucket/laion400m/{00000..41407}.tar' \
      --config.data.tokenizer=/path/to/hf-tokenizer --config.distributed.auto=True

Args (comma-separated, e.g. `configs/clip_b16.py:data=tfds,remat=full`):
  data=webdataset|tfds  img2dataset tar shards (data.shards), or a prepared TFDS dataset
                        (data.tfds_name, data.data_dir; captions in data.text_key)
  remat=none|full|dots_saveable|...   what backprop keeps of each block (model.remat)
  scan=True|False       the blocks as one nn.scan (fast compile) or unrolled
  smoke                 the same model at batch 8 for 2 steps on built-in shapes at 224 px:
                        a CPU check that the config builds, compiles and steps

Recipe: CLIP (Radford et al. 2021, tables 19-20; open_clip's ViT-B/16 runs keep it):
batch 32,768; AdamW lr 5e-4 (B/16), beta1 0.9, beta2 0.98, eps 1e-6, weight decay 0.2
(decoupled, x lr, as PyTorch's and optax's adamw); 2,000 warmup steps then cosine to 0;
32 epochs of 400M pairs = 390,625 steps; temperature init 0.07; 77 text tokens.
Text tower B (width 768, 12 layers) where CLIP's B/16 used 512; projection 512.
Set data.tokenizer to a Hugging Face tokenizer: without one, WordPiece would be trained
on every caption of every shard.
"""
import ml_collections

from mmjax.config import ConfigError, base_config, data_block, parse_arg, tower
from mmjax.config_blocks import shapes_data

ARGS = dict(data="webdataset", remat="none", scan=True)


def get_config(arg=None):
  flags, args = parse_arg(arg, {"smoke"}, ARGS, where="configs/clip_b16.py")
  c = base_config()
  c.batch_size = 32_768
  c.total_steps = 390_625
  c.log_every = 100
  c.checkpoint_every = 1000
  c.optim.update(dict(name="adamw", lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2,
                      schedule="cosine", warmup_steps=2000, end_lr_factor=0.0, clip_norm=0.0))
  image = dict(image_size=224, max_len=77, mean=(0.48145466, 0.4578275, 0.40821073),
               std=(0.26862954, 0.26130258, 0.27577711),        # CLIP's pixel statistics
               augment=dict(crop_scale=(0.9, 1.0), flip=False), vocab_size=32_000)
  if args["data"] == "webdataset":
    c.data = data_block("webdataset", shards="", shuffle_buffer=10_000, num_workers=8, **image)
  elif args["data"] == "tfds":
    c.data = data_block("tfds", tfds_name="", text_key="caption", label_key="",
                        num_workers=8, **image)
  else:
    raise ConfigError(f"configs/clip_b16.py: data={args['data']!r}: expected webdataset or tfds")
  c.model = ml_collections.ConfigDict(dict(
      image=tower(variant="B/16", act="quick_gelu", pre_norm=True, final_norm="pooled"),
      text=tower(variant="B", pool="eos", causal=True, act="quick_gelu", vocab_size=0),
      embed_dim=512, dtype="bfloat16", dropout=0.0, drop_path=0.0,
      scan_layers=args["scan"], remat=args["remat"]))
  c.objectives = ml_collections.ConfigDict(dict(contrastive=1.0))
  # Each device holds its [local, local] logit blocks only (mmjax/chunked_losses.py).
  c.objective_options = ml_collections.ConfigDict(dict(contrastive=dict(chunked=True)))
  c.evals = ml_collections.ConfigDict()     # add retrieval on data.eval_shards, zero-shot, ...

  if "smoke" in flags:
    c.batch_size, c.total_steps, c.log_every = 8, 2, 1
    c.checkpoint_every, c.optim.warmup_steps = 0, 1
    c.data = shapes_data(image_size=224, max_len=77, train_size=64, eval_size=16)
  return c
