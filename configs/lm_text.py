"""A GPT-style causal language model on your own text: fine-tune a GPT-2, or train one.

  mmjax finetune --config configs/lm_text.py:/data/corpus.txt --init /models/gpt2 \\
      --workdir runs/lm
  mmjax convert --from-hf /models/gpt2 --to runs/gpt2 --max-len 128     # or from a workdir
  mmjax finetune --config configs/lm_text.py:/data/corpus.txt --init runs/gpt2 --workdir runs/lm
  mmjax generate --workdir runs/lm --text "Once upon a time" --temperature 0.8 --top-k 40

The corpus is a .txt file (one document per line) or a JSONL/CSV file with a `text`
column (`data.text_key`). With --init (a GPT-2 Hugging Face directory or a converted
workdir) the decoder and its byte-level BPE tokenizer are the checkpoint's
(`init.towers`); from scratch, a small decoder and a WordPiece tokenizer trained on the
corpus. Each text trains as `BOS text EOS` (GPT-2: <|endoftext|> both), cut to
`data.max_len` tokens, with the loss on its real tokens only (objective `lm`).

arg: PATH[,token,...]
  max_len=N    tokens per text (default 128)
  tiny         a seconds-long run for tests
"""
import math

import ml_collections

from mmjax.config import ConfigError, base_config, data_block, parse_arg, tower
from mmjax.config_blocks import ROW_SUFFIXES, TINY_TOWER, path_arg, train_rows
from mmjax.tuning.config import finetune_config, init_config


def get_config(arg=None):
  path, rest = path_arg(arg, {"tiny"}, where="configs/lm_text.py")
  tokens, opts = parse_arg(rest, {"tiny"}, dict(max_len=128), where="configs/lm_text.py")
  if path.suffix.lower() not in ROW_SUFFIXES + (".txt",):
    raise ConfigError(f"configs/lm_text.py: {path}: expected a .txt, .jsonl or .csv file")
  n = train_rows(path, 0.0) or 1000

  c = base_config()
  c.batch_size = 16
  c.epochs = float(min(20, max(3, math.ceil(500 * c.batch_size / max(n, 1)))))
  c.optim.warmup_epochs = 0.5
  c.optim.lr = 3e-4
  c.optim.weight_decay = 0.01
  c.checkpoint_every_epochs = 5.0
  c.keep_checkpoints = 1
  c.log_every = 20
  c.data = data_block("files", path=str(path), image_key="", text_key="text",
                      max_len=opts["max_len"], vocab_size=8000)
  c.model = ml_collections.ConfigDict(dict(
      text=tower(width=256, depth=4, heads=4, mlp_dim=1024, vocab_size=0, pool="eos",
                 act="gelu_tanh", causal=True, head="lm"),
      dtype="float32", dropout=0.1, drop_path=0.0))
  c.objectives = ml_collections.ConfigDict(dict(lm=1.0))
  c.finetune = finetune_config(strategy="full")
  c.init = init_config(towers=("text",), lr=5e-5)
  c.evals = ml_collections.ConfigDict()

  if "tiny" in tokens:
    c.epochs = 0.0
    c.total_steps = 30
    c.batch_size = 16
    c.log_every = 5
    c.optim.warmup_epochs = 0.0
    c.optim.warmup_steps = 2
    c.optim.lr = 3e-3
    c.init.lr = 3e-3
    c.checkpoint_every_epochs = 0.0
    c.checkpoint_every = 0
    c.model.text.update(TINY_TOWER)
    c.model.dropout = 0.0
    c.data.vocab_size = 256
  return c
