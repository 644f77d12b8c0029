"""Tag the words of `shapes` captions (NER, BIO): sizes, colours and shapes, and relation
phrases ("left of" is B-REL I-REL); every other word is O. A text tower with a classifier
on every token, scored by entity-level F1 (seqeval).

  mmjax train --config configs/finetune_ner.py --workdir DIR                   # from scratch
  mmjax finetune --config configs/finetune_ner.py --init DEMO_WORKDIR --workdir DIR

The text tower and data settings are configs/demo.py's, so a demo workdir's text tower
(and its cached tokenizer) fit; `init.ignore` leaves its other towers unused.

arg "tiny": a seconds-long variant for tests.
"""
import ml_collections

from mmjax.config import base_config, tower
from mmjax.data.shapes import WORD_TAGS
from mmjax.tuning.config import finetune_config, init_config


def get_config(arg=None):
  c = base_config()
  c.total_steps = 300
  c.batch_size = 64
  c.log_every = 50
  c.checkpoint_every = 0
  c.keep_checkpoints = 1

  # As the demo's (same tokenizer and render cache). max_len 16 holds every caption:
  # the longest, with three objects, is 14 tokens.
  c.data = ml_collections.ConfigDict(dict(
      name="shapes", image_size=32, max_len=16, seed=0, num_workers=0,
      train_size=50_000, eval_size=1024, num_objects=(1, 3),
      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), augment=dict(crop_scale=(1.0, 1.0), flip=False),
      tokenizer="", vocab_size=256, cache_dir="",
      token_labels="word_tags"))
  c.model = ml_collections.ConfigDict(dict(
      text=tower(vocab_size=0, width=96, depth=2, heads=4, mlp_dim=192),
      classifier=dict(input="text_tokens", num_classes=len(WORD_TAGS)), dtype="float32",
      dropout=0.0, drop_path=0.0))
  c.objectives = ml_collections.ConfigDict(dict(token_classify=1.0))
  c.objective_options = ml_collections.ConfigDict(dict(
      token_classify=dict(label="word_tags", label_smoothing=0.0)))
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 30
  c.finetune = finetune_config(strategy="full")
  # From a pretrained workdir, take the text tower only (not the image tower, fusion,
  # projections or heads).
  c.init = init_config(ignore=r"^(?!text_tower/)")
  c.evals = ml_collections.ConfigDict(dict(
      ner=dict(type="ner", split="test", label="word_tags")))

  if arg == "tiny":
    c.total_steps = 20
    c.batch_size = 16
    c.eval_batch_size = 64
    c.log_every = 10
    c.optim.warmup_steps = 2
    c.data.train_size = 512
    c.data.eval_size = 64
    c.model.text.update(width=32, depth=1, heads=2, mlp_dim=64)
  elif arg:
    raise ValueError(f"configs/finetune_ner.py: unknown arg {arg!r} (known: 'tiny')")
  return c
