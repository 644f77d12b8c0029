"""Answer questions about `shapes` images by generating the answer: the decoder reads
"[CLS] question [SEP]" as its prefix (attended both ways, prefix-LM) while cross-attending
to the image tokens, and generates "answer [SEP]"; the loss is on the answer tokens only.

  mmjax train --config configs/vqa_gen_shapes.py --workdir runs/vqa_gen

Compare with configs/finetune_vqa.py, the same task as classification over the answers.

args (comma-separated): "image_prefix": PaliGemma style, no cross-attention: the image
tokens (projected to the decoder's width) come first in the decoder's input, and they and
the question attend to each other both ways; "tiny": a seconds-long variant for tests.

  mmjax train --config configs/vqa_gen_shapes.py:image_prefix --workdir runs/vqa_gen_prefix
"""
import ml_collections

from mmjax.config import base_config, parse_arg, tower
from mmjax.config_blocks import DEMO_SIZE, TINY_TOWER, shapes_data

MAX_ANSWER_TOKENS = 4   # one word and [SEP], with room for a word split into pieces


def get_config(arg=None):
  flags, _ = parse_arg(arg, {"tiny", "image_prefix"}, where="configs/vqa_gen_shapes.py")
  image_prefix = "image_prefix" in flags
  c = base_config()
  c.total_steps = 1500
  c.batch_size = 64
  c.log_every = 50
  c.checkpoint_every = 0
  c.keep_checkpoints = 1
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100

  c.data = shapes_data(text_field="answer", prefix_field="question")
  # Generation pads each question to data.max_len and appends the answer: the position
  # table covers both.
  c.model = ml_collections.ConfigDict(dict(
      image=tower(patch=4, **DEMO_SIZE),
      text=tower(vocab_size=0, causal=True, head="lm", pool="eos",
                 max_len=c.data.max_len + MAX_ANSWER_TOKENS, **dict(DEMO_SIZE, depth=2)),
      decoder=dict(cross_attention=not image_prefix, prefix_lm=True, tie_embed=True,
                   image_prefix=image_prefix),
      dtype="float32", dropout=0.0, drop_path=0.0))
  c.objectives = ml_collections.ConfigDict(dict(caption=1.0))
  c.objective_options = ml_collections.ConfigDict(dict(caption=dict(label_smoothing=0.0)))
  c.evals = ml_collections.ConfigDict(dict(
      vqa=dict(type="vqa_gen", split="test", max_new_tokens=MAX_ANSWER_TOKENS, examples=0)))

  if "tiny" in flags:
    c.total_steps = 20
    c.batch_size = 16
    c.eval_batch_size = 64
    c.log_every = 10
    c.optim.warmup_steps = 2
    c.data.train_size = 512
    c.data.eval_size = 64
    for t in (c.model.image, c.model.text):
      t.update(TINY_TOWER)
  return c
