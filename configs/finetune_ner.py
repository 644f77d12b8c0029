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

from mmjax.config import base_config, parse_arg
from mmjax.config_blocks import TINY_TOWER, demo_towers, shapes_data
from mmjax.data.shapes import WORD_TAGS
from mmjax.tuning.config import finetune_config, init_config


def get_config(arg=None):
  flags, _ = parse_arg(arg, {"tiny"}, where="configs/finetune_ner.py")
  c = base_config()
  c.total_steps = 300
  c.batch_size = 64
  c.log_every = 50
  c.checkpoint_every = 0
  c.keep_checkpoints = 1

  # As the demo's (same tokenizer and render cache). max_len 16 holds every caption:
  # the longest, with three objects, is 14 tokens.
  c.data = shapes_data(token_labels="word_tags")
  c.model = ml_collections.ConfigDict(dict(
      text=demo_towers()["text"],
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

  if "tiny" in flags:
    c.total_steps = 20
    c.batch_size = 16
    c.eval_batch_size = 64
    c.log_every = 10
    c.optim.warmup_steps = 2
    c.data.train_size = 512
    c.data.eval_size = 64
    c.model.text.update(TINY_TOWER)
  return c
