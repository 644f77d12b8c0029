"""Caption `shapes` images: a CoCa-style model, an image tower and a text decoder whose
blocks cross-attend to the image tokens, trained on next-token cross-entropy (caption)
together with a CLIP contrastive loss between the image and the decoder's text-only pass.

  mmjax train --config configs/caption_shapes.py --workdir runs/cap
  mmjax train --config configs/caption_shapes.py:nocontrastive ...   # captioning alone

Evaluated by greedy captions of held-out images: exact match, BLEU, CIDEr-D, and the
colour / shape / size words of single-object images (mmjax/evals/captioning.py).

args (comma-separated): "nocontrastive"; "image_prefix": the image tokens are the
decoder's first tokens (attended both ways, PaliGemma style) instead of cross-attention;
"tiny": a seconds-long variant for tests.
"""
import ml_collections

from mmjax.config import base_config, parse_arg, tower
from mmjax.config_blocks import DEMO_SIZE, TINY_TOWER, shapes_data


def get_config(arg=None):
  flags, _ = parse_arg(arg, {"tiny", "nocontrastive", "image_prefix"},
                       where="configs/caption_shapes.py")
  c = base_config()
  # 900 steps at twice the lr of the first recipe (1,200 steps at 1e-3 went over the
  # 10-minute CPU budget): BENCHMARKS.md "caption_shapes".
  c.total_steps = 900
  c.batch_size = 64
  c.log_every = 50
  c.checkpoint_every = 0
  c.keep_checkpoints = 1
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50

  # [CLS] caption [SEP]: [CLS] is the decoder's BOS (its prompt), [SEP] its EOS.
  c.data = shapes_data()
  contrastive = "nocontrastive" not in flags
  c.model = ml_collections.ConfigDict(dict(
      image=tower(patch=4, **DEMO_SIZE),
      text=tower(vocab_size=0, causal=True, head="lm", pool="eos", **dict(DEMO_SIZE, depth=2)),
      decoder=dict(cross_attention="image_prefix" not in flags, prefix_lm=False,
                   tie_embed=True, image_prefix="image_prefix" in flags),
      embed_dim=96 if contrastive else 0, dtype="float32", dropout=0.0, drop_path=0.0))
  c.objectives = ml_collections.ConfigDict(
      dict(contrastive=1.0, caption=2.0) if contrastive else dict(caption=1.0))
  c.objective_options = ml_collections.ConfigDict(dict(caption=dict(label_smoothing=0.0)))
  c.evals = ml_collections.ConfigDict(dict(
      caption=dict(type="captioning", split="test", max_new_tokens=0, examples=0)))

  if "tiny" in flags:
    c.total_steps = 40
    c.batch_size = 16
    c.eval_batch_size = 64
    c.log_every = 10
    c.optim.warmup_steps = 2
    c.optim.lr = 3e-3
    c.data.train_size = 512
    c.data.eval_size = 64
    for t in (c.model.image, c.model.text):
      t.update(TINY_TOWER)
    if contrastive:
      c.model.embed_dim = 32
  return c
