"""A text classifier on your own labelled texts, from scratch or from a BERT / MiniLM.

  mmjax finetune --config configs/classify_text.py:/data/reviews.jsonl --workdir runs/txt
  mmjax finetune --config configs/classify_text.py:/data/{split}.csv --workdir runs/txt \\
      --init /models/all-MiniLM-L6-v2

The file is JSONL or CSV with a `text` and a `label` column (`data.text_key`,
`data.label_key`); labels are strings or integers. `{split}` in the path names one file
per split ("train", "test"); without it a stratified 20% of the rows is held out (by
`data.seed`). From scratch, a WordPiece tokenizer is trained on the train texts; with
--init (an mmjax workdir or a Hugging Face BERT-family directory) the text tower, its
tokenizer and text length are the checkpoint's (`init.towers`).

arg: PATH[,token,...]
  max_len=N    tokens per text (default 64)
  tiny         a seconds-long run for tests
"""
import math

import ml_collections

from mmjax.config import ConfigError, base_config, data_block, parse_arg, tower
from mmjax.config_blocks import ROW_SUFFIXES, TINY_TOWER, path_arg, train_rows
from mmjax.tuning.config import finetune_config, init_config

# HF tensors a text classifier leaves unused: MLM / NSP heads, a CLIP's image side and
# projections, an old classification head.
UNUSED_HF = (r"^(cls\.|vision_model\.|visual_projection|text_projection|logit_scale|"
             r"classifier\.)")


def get_config(arg=None):
  path, rest = path_arg(arg, {"tiny"}, where="configs/classify_text.py")
  tokens, opts = parse_arg(rest, {"tiny"}, dict(max_len=64), where="configs/classify_text.py")
  test_fraction = 0.0 if "{split}" in str(path) else 0.2
  if path.suffix.lower() not in ROW_SUFFIXES:
    raise ConfigError(f"configs/classify_text.py: {path}: expected a .jsonl or .csv file")
  n = train_rows(path, test_fraction) or 1000

  c = base_config()
  c.batch_size = 32
  c.eval_batch_size = 256
  c.epochs = float(min(50, max(10, math.ceil(1000 * c.batch_size / max(n, 1)))))
  c.optim.warmup_epochs = 1.0
  c.checkpoint_every_epochs = 5.0
  c.keep_checkpoints = 1
  c.log_every = 20
  c.data = data_block(
      "files", path=str(path), image_key="", text_key="text", label_key="label",
      test_fraction=test_fraction, max_len=opts["max_len"],
      vocab_size=8000)
  c.model = ml_collections.ConfigDict(dict(
      text=tower(width=128, depth=4, heads=4, mlp_dim=512, vocab_size=0),
      classifier=dict(input="text", num_classes=0), dtype="float32",
      dropout=0.1, drop_path=0.0))
  c.objectives = ml_collections.ConfigDict(dict(classify=1.0))
  c.objective_options = ml_collections.ConfigDict(dict(
      classify=dict(label="label", label_smoothing=0.1)))
  c.optim.lr = 5e-4
  c.optim.weight_decay = 0.01
  c.finetune = finetune_config(strategy="full")
  c.init = init_config(towers=("text",), ignore=UNUSED_HF, lr=5e-5)   # BERT's fine-tune rate
  c.evals = ml_collections.ConfigDict(dict(
      report=dict(type="classification", split="test", label="label")))

  if "tiny" in tokens:
    c.epochs = 3.0
    c.batch_size = 16
    c.log_every = 5
    c.optim.warmup_epochs = 0.0
    c.optim.warmup_steps = 2
    c.optim.lr = 2e-3
    c.checkpoint_every_epochs = 0.0
    c.checkpoint_every = 0
    c.model.text.update(TINY_TOWER)
    c.model.dropout = 0.0
    c.data.vocab_size = 256
  return c
