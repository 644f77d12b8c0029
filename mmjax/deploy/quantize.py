"""`mmjax quantize`: a trained workdir -> a new workdir whose checkpoint holds int8 weights.

  mmjax quantize --workdir runs/digits --out runs/digits_int8 --mode int8-weight
  mmjax quantize --workdir runs/digits --out runs/digits_w8a8 --mode w8a8 --calibration-steps 8

Post-training quantization with qwix (mmjax/models/quantized.py): every Dense kernel
becomes int8 with a float32 scale per output channel (absmax). `w8a8` also quantizes
each Dense's input to int8: per token at run time, or, with `--calibration-steps N`, with
one fixed scale per layer averaged over N batches of the training split (static range).
The new workdir's config records `model.quantize`, so `mmjax eval`, `mmjax.load` and the
server rebuild the model quantized and read its checkpoint like any other.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import qwix

from mmjax import data as mmdata
from mmjax import io, parallel
from mmjax.models import quantized, variables
from mmjax.train.loop import _init_variables_fn
from mmjax.train.state import TrainState

# Files of a workdir that readers need besides the checkpoint and config.json.
CARRIED = ("tokenizer.json", "vocab.txt", "label_names.json", "hf_config.json")


class QuantizeError(ValueError):
  """A bad argument, or a --workdir that cannot be read or quantized: the caller's to fix."""


def _tree_bytes(tree: Any) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def dir_bytes(path: pathlib.Path) -> int:
  """Bytes of every file under `path` (a checkpoint's size on disk)."""
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def _check_out(out: pathlib.Path) -> None:
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"--out {out} exists and is not an empty directory; nothing was "
                          f"written (choose a new directory)")


def calibrate(config, model, params, batch_stats, tokenizer, mode: str, steps: int) -> dict:
  """qwix quant_stats for static w8a8: each quantized Dense input's absmax per token
  position, the max over the examples of `steps` batches of the train split (eval
  transform, in order)."""
  qt = quantized.qt_model(model, mode, static=True)
  mesh = parallel.make_mesh(config.get("mesh", {}))
  it = mmdata.make_iterator(config.data, "train", batch_size=config.eval_batch_size,
                            train=False, tokenizer=tokenizer)
  rngs = {k: jax.random.PRNGKey(i) for i, k in enumerate(("dropout", "itm", "mlm"))}
  # count stays 1 and sum_of_absmax holds the max, so qwix's average is the max.
  over_batch = lambda x: x.max(axis=0, keepdims=True) if x.ndim else x

  # The variables are an argument, not a closure: captured, they would be constants
  # that XLA folds at compile time (seconds per layer).
  @jax.jit
  def batch_absmax(model_variables, batch):
    _, updated = qt.apply(model_variables, batch, train=False, rngs=rngs,
                          mutable=["quant_stats"])
    return jax.tree.map(over_batch, updated["quant_stats"])

  model_variables = variables(params, batch_stats)

  stats = None
  for _ in range(steps):
    batch = next(it, None)
    if batch is None:
      break
    got = batch_absmax(model_variables, parallel.device_batch(batch, mesh))
    stats = got if stats is None else jax.tree.map(jnp.maximum, stats, got)
  if stats is None:
    raise QuantizeError(f"--calibration-steps={steps}: the train split of "
                        f"{config.data.get('name')!r} gave no batch to calibrate on")
  return jax.device_get(stats)


def quantize(workdir, out, mode: str, calibration_steps: int = 0, step: int | None = None
             ) -> dict[str, Any]:
  """Write the quantized workdir `out` from `workdir`'s checkpoint (`step`, default the
  newest); returns what was done and the sizes before and after (bytes)."""
  out = pathlib.Path(out).expanduser().absolute()
  _check_out(out)
  if calibration_steps < 0:
    raise QuantizeError(f"--calibration-steps={calibration_steps}: expected >= 0")
  static = calibration_steps > 0
  if static and mode != "w8a8":
    raise QuantizeError(f"--calibration-steps sets static activation scales, which only "
                        f"--mode w8a8 has (got --mode {mode})")
  about = _load(workdir, None, params=False)    # config only: checks first
  if about.kind != "workdir":
    raise QuantizeError(f"--workdir {workdir} is a Hugging Face directory; convert it first "
                        f"(mmjax convert --from-hf DIR --to WORKDIR)")
  if (about.config.model.get("quantize") or {}).get("mode"):
    raise QuantizeError(f"--workdir {workdir} is quantized already "
                        f"(model.quantize={about.config.model.quantize.to_dict()})")
  quantized.check_quantizable(about.config.model, mode)
  loaded = _load(workdir, step)
  config = loaded.config

  model = loaded.model()
  params = jax.tree.map(jnp.asarray, loaded.params)
  stats = (calibrate(config, model, params, loaded.batch_stats, loaded.tokenizer, mode,
                     calibration_steps) if static else {})
  qmodel = quantized.ptq_model(model, mode, static)
  abstract = jax.eval_shape(_init_variables_fn(qmodel, config, jax.random.PRNGKey(0)))
  qparams = quantized.to_saved(qwix.quantize_params(params, abstract["params"], stats))

  qconfig = copy.deepcopy(config)
  with qconfig.unlocked():
    qconfig.model.quantize = ml_collections.ConfigDict(dict(mode=mode, static=static))
  # Written beside `out` and renamed into place: a failure leaves no half workdir.
  tmp = out.with_name(f".{out.name}.partial")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  for name in CARRIED:
    if (loaded.path / name).is_file():
      (tmp / name).write_bytes((loaded.path / name).read_bytes())   # also from gs://
  state = TrainState(step=jnp.asarray(loaded.step, jnp.int32), params=qparams, opt_state={},
                     rng=jax.random.PRNGKey(config.get("seed", 0)),
                     batch_stats=loaded.batch_stats)
  ckpt = io.Checkpointer(tmp, keep=1, async_save=False)
  ckpt.save(loaded.step, state, {"quantized_from": {"path": str(loaded.path),
                                                    "step": loaded.step}},
            qconfig.to_json_best_effort())
  ckpt.wait()
  ckpt.close()
  (tmp / "config.json").write_text(qconfig.to_json_best_effort(indent=2))
  if out.exists():
    out.rmdir()     # empty (checked above)
  tmp.rename(out)
  return {"workdir": str(loaded.path), "out": str(out), "step": loaded.step, "mode": mode,
          "calibration_steps": calibration_steps if static else 0,
          "float_params_bytes": _tree_bytes(params),
          "quantized_params_bytes": _tree_bytes(qparams),
          "checkpoint_bytes": dir_bytes(out / "checkpoints")}


def _load(workdir, step: int | None, params: bool = True) -> io.Loaded:
  """`io.load` of --workdir, whose ValueErrors (malformed config or JSON, a checkpoint of
  another model, a broken delta base) and KeyErrors (a config without a key) are about
  the files given: QuantizeError. Errors of the quantization itself stay what they are."""
  try:
    return io.load(workdir, step, params=params, what="--workdir")
  except (ValueError, KeyError) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    raise QuantizeError(message) from e


def add_arguments(p) -> None:
  """`mmjax quantize`'s flags on the argparse (sub)parser `p`."""
  p.add_argument("--workdir", required=True, help="a trained mmjax workdir")
  p.add_argument("--out", required=True, metavar="DIR",
                 help="the quantized workdir to write: a new (or empty) directory")
  p.add_argument("--mode", required=True, choices=sorted(quantized.MODES),
                 help="int8-weight: int8 Dense weights; w8a8: and int8 Dense inputs")
  p.add_argument("--calibration-steps", type=int, default=0, metavar="N",
                 help="w8a8: static input scales from N train batches (default 0: each "
                      "input's scale is computed per token at run time)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)


def main(args) -> int:
  """`mmjax quantize` (args from mmjax.cli); exit 2 with one line on a user error. Any
  other exception is a bug in mmjax (or qwix) and keeps its traceback."""
  try:
    result = quantize(args.workdir, args.out, args.mode, args.calibration_steps, args.step)
  except (FileNotFoundError, FileExistsError, PermissionError, QuantizeError,
          quantized.NotQuantizable, mmdata.DataError) as e:
    if os.environ.get("MMJAX_TRACEBACK"):
      raise
    print(f"mmjax quantize: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0
