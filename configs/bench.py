"""The train-step benchmark: a small CLIP that matches HF `CLIPModel` layer for layer.

ViT patch 4 at 32x32 (64 patches + CLS), width 192, depth 6, 3 heads, MLP 768,
pre-LN on the embeddings; causal text tower, 32 tokens, vocab 8192, EOS pooling;
quick_gelu everywhere (CLIP's default); projection 128; batch 64; AdamW; CLIP loss.
`benchmarks/train_step.py` times it against transformers' PyTorch CLIPModel
built from the same sizes. The built-in `shapes` data makes it trainable too:

  mmjax train --config configs/bench.py --workdir workdirs/bench
"""
import ml_collections

from mmjax.config import base_config, parse_arg, tower
from mmjax.config_blocks import shapes_data


def get_config(arg=None):
  parse_arg(arg, where="configs/bench.py")     # it takes none
  c = base_config()
  c.log_every = 25
  c.checkpoint_every = 0
  c.keep_checkpoints = 1

  # The tokenizer is only used to turn shapes captions into ids when training;
  # the model's vocabulary is fixed at 8192 below, so no vocabulary file is read.
  c.data = shapes_data(max_len=32)

  clip = dict(width=192, depth=6, heads=3, mlp_dim=768, act="quick_gelu", ln_eps=1e-5)
  # HF CLIPVisionModel: bias-free patch conv, a position for the CLS token,
  # LayerNorm before the encoder and on the pooled CLS token only.
  c.model = ml_collections.ConfigDict(dict(
      image=tower(patch=4, pre_norm=True, patch_bias=False, posemb_cls=True,
                  final_norm="pooled", **clip),
      text=tower(pool="eos", causal=True, vocab_size=8192, **clip),
      embed_dim=128, dtype="float32", dropout=0.0, drop_path=0.0,
      tower_splits=2))          # 2 concurrent half-batches per tower: faster on 2 CPU cores

  c.objectives = ml_collections.ConfigDict(dict(contrastive=1.0))
  # HF's AdamW defaults, no clipping: the same update rule as the PyTorch side.
  c.optim.update(dict(lr=1e-4, b2=0.999, weight_decay=0.01, clip_norm=0.0))
  c.evals = ml_collections.ConfigDict(dict(retrieval=dict(type="retrieval", split="test")))
  return c
