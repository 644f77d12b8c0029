"""An mmjax workdir on disk: what `mmjax train` writes and what every reader needs.

  <workdir>/config.json      the run config (also in each checkpoint)
  <workdir>/checkpoints/N    Orbax steps (mmjax.io.checkpointer)
  <workdir>/tokenizer.json   the tokenizer the run used
  <workdir>/hf_config.json   the original HF config of a converted checkpoint (for export)
  <workdir>/label_names.json {label field: [class name, ...]} of the train split, in id
                             order (what a classifier's logits mean)

`write_workdir` lays out a converted checkpoint as `mmjax train` would have at
step 0, plus config.py (so `--config DIR/config.py` works); `mmjax train` on the
same workdir fine-tunes it.
"""
from __future__ import annotations

import json
import pathlib
import pprint

import ml_collections

from mmjax.config import load_config
from mmjax.io import storage
from mmjax.io.checkpointer import Checkpointer
from mmjax.io.jsonfile import read_json

_CONFIG_PY = '''"""mmjax config of a converted Hugging Face checkpoint (by `mmjax convert`)."""
import ml_collections

CONFIG = {config}


def get_config(arg=None):
  return ml_collections.ConfigDict(CONFIG)
'''
# data fields the pretrained model fixes; the rest of `data` comes from the base config.
_MODEL_DATA = ("image_size", "max_len", "mean", "std")


def is_workdir(path) -> bool:
  path = storage.as_path(path)
  return (path / "checkpoints").is_dir() and (path / "config.json").is_file()


def run_config_of(workdir) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(read_json(storage.as_path(workdir) / "config.json",
                                             "the run config of an mmjax workdir"))


def run_config(pretrained, base: ml_collections.ConfigDict | None,
               tokenizer_path: str) -> ml_collections.ConfigDict:
  """The base run config (default: configs/demo.py, with no evals) with the pretrained
  model's towers, projections and the data fields they fix."""
  explicit = base is not None
  d = (base if explicit else load_config("demo")).to_dict()
  model = pretrained.config.model.to_dict()
  if explicit and d["model"].get("fusion"):
    model["fusion"] = d["model"]["fusion"]
  d["model"] = dict(model, dropout=d["model"].get("dropout", 0.0),
                    drop_path=d["model"].get("drop_path", 0.0))
  for key in _MODEL_DATA:
    if key in pretrained.config.data:
      d["data"][key] = pretrained.config.data[key]
  d["data"]["tokenizer"] = tokenizer_path
  if not explicit:
    d["evals"] = {}
    d["objectives"] = {"contrastive": 1.0} if model.get("embed_dim") else {}
  return ml_collections.ConfigDict(d)


def write_workdir(workdir, config: ml_collections.ConfigDict, state, hf_config: dict,
                  tokenizer=None) -> pathlib.Path:
  """Save the train `state` (step 0: params and a fresh optimizer state, see
  `mmjax.train.state.initial_state`) as a workdir of a run of `config`."""
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  if tokenizer is not None:
    tokenizer.save(workdir)
  ckpt = Checkpointer(workdir, keep=config.keep_checkpoints, async_save=False)
  ckpt.save(0, state, {}, config.to_json_best_effort())
  ckpt.wait()
  ckpt.close()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  (workdir / "config.py").write_text(_CONFIG_PY.format(
      config=pprint.pformat(config.to_dict(), indent=1, width=100, sort_dicts=False)))
  (workdir / "hf_config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  return workdir


def hf_config_of(workdir) -> dict | None:
  path = storage.as_path(workdir) / "hf_config.json"
  return read_json(path, "the Hugging Face config.json of the converted model") \
      if path.is_file() else None


LABEL_NAMES = "label_names.json"


def write_label_names(workdir, label_names: dict) -> None:
  """The train split's class names per label field, so a reader of the workdir (the
  classification report, a server) can name a class id without the data."""
  if label_names:
    path = storage.as_path(workdir) / LABEL_NAMES
    path.write_text(json.dumps({k: list(v) for k, v in label_names.items()}, indent=1) + "\n")


def write_tokenizer(workdir, tokenizer) -> None:
  """<workdir>/tokenizer.json: the tokenizer the run used (readers of the workdir use it).
  A local file is written beside and renamed into place (Tokenizer.save); an object is
  written whole by one upload, which is atomic already."""
  workdir = storage.as_path(workdir)
  if storage.is_remote(workdir):
    (workdir / "tokenizer.json").write_text(tokenizer.hf.to_str())
  else:
    tokenizer.save(workdir)


def label_names_of(workdir) -> dict[str, list[str]]:
  """What `write_label_names` wrote; {} for a workdir without it."""
  path = storage.as_path(workdir) / LABEL_NAMES
  return read_json(path, "the class names of the run") if path.is_file() else {}
