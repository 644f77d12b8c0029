"""An mmjax workdir from a converted checkpoint, and params back out of any workdir.

`write_workdir` lays out what `mmjax train` would have written at step 0:
checkpoints/0 (Orbax: train state with fresh optimizer state, data state,
config), config.json, plus config.py (so `--config DIR/config.py` works),
hf_config.json (the original HF config, kept for export) and the tokenizer.
`mmjax eval --config DIR/config.py --workdir DIR` evaluates the converted model,
and `mmjax train` on the same workdir fine-tunes it.
"""
from __future__ import annotations

import json
import pathlib
import pprint

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from mmjax.config import load_config
from mmjax.train.checkpoint import Checkpointer, fill_params
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import TrainState

_CONFIG_PY = '''"""mmjax config of a converted Hugging Face checkpoint (by `mmjax convert`)."""
import ml_collections

CONFIG = {config}


def get_config(arg=None):
  return ml_collections.ConfigDict(CONFIG)
'''
# data fields the pretrained model fixes; the rest of `data` comes from the base config.
_MODEL_DATA = ("image_size", "max_len", "mean", "std")


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


def write_workdir(workdir, config: ml_collections.ConfigDict, params, hf_config: dict,
                  tokenizer=None) -> pathlib.Path:
  """Save `params` as step 0 of an mmjax run of `config` in `workdir`."""
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  if tokenizer is not None:
    tokenizer.save(workdir)
  tx, _ = make_optimizer(config.optim, params, config.total_steps)
  _, state_rng = jax.random.split(jax.random.PRNGKey(config.get("seed", 0)))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=state_rng)
  ckpt = Checkpointer(workdir, keep=config.get("keep_checkpoints", 3), async_save=False)
  ckpt.save(0, state, {}, config.to_json_best_effort())
  ckpt.wait()
  ckpt.close()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  (workdir / "config.py").write_text(_CONFIG_PY.format(
      config=pprint.pformat(config.to_dict(), indent=1, width=100, sort_dicts=False)))
  (workdir / "hf_config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  return workdir


def read_workdir(workdir, step: int | None = None):
  """(config, params, step) of a workdir written by `mmjax train` or `write_workdir`."""
  workdir = pathlib.Path(workdir).absolute()
  config_path = workdir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{workdir}: no config.json (not an mmjax workdir)")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  ckpt = Checkpointer(workdir)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  # No target: the params come back as saved, without rebuilding the optimizer or tokenizer.
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  params = restored.state["params"]
  base = ckpt.base_of(step)
  if base:   # a delta checkpoint: the frozen params come from the one it points to
    params = fill_params(params, ckpt.base_params(step, base))
  ckpt.close()
  return config, params, step


def hf_config_of(workdir) -> dict | None:
  path = pathlib.Path(workdir) / "hf_config.json"
  return json.loads(path.read_text()) if path.is_file() else None
