"""MFU of the train step alone: one real batch kept on the device, stepped again and again.

  python3 scripts/device/step_mfu.py --config configs/clip_b16.py:smoke \
      [--batches 256,512] [--warmup 5] [--steps 30] [--config.key=value ...]

The step, its FLOP count and the peak are the train loop's own (`loop.setup`,
`loop.make_step`, `mfu.compile_step`); only the input pipeline is left out, so that
`mmjax train`'s logged MFU can be read against the step's: a gap between the two is the
host feeding the device too slowly. One JSON line per batch size (`--batches` overrides
config.batch_size; each is its own compilation).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mmjax import data as mmdata  # noqa: E402
from mmjax import parallel  # noqa: E402
from mmjax.config import load_config  # noqa: E402
from mmjax.train import mfu  # noqa: E402
from mmjax.train.loop import make_step, setup  # noqa: E402


def measure(config, warmup: int, steps: int) -> dict:
  run = setup(config)
  c = run.config
  iterator = mmdata.make_iterator(c.data, "train", batch_size=c.batch_size, train=True,
                                  tokenizer=run.tokenizer, source=run.sources.get(c.data, "train"))
  batch = parallel.device_batch(next(iterator), run.mesh)
  t = time.perf_counter()
  step_fn, cost = mfu.compile_step(make_step(run), c, run.state, batch)
  compile_s = time.perf_counter() - t
  state = run.state
  for _ in range(warmup):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready((state, metrics))
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - t
  rate = steps / seconds
  return {"batch_size": c.batch_size, "steps": steps, "seconds": round(seconds, 3),
          "steps_per_s": round(rate, 3), "images_per_s": round(rate * c.batch_size, 1),
          **{k: round(v, 4) for k, v in cost.rates(rate).items()},
          "flops_per_step_per_device": cost.flops, "peak_flops": cost.peak,
          "compile_s": round(compile_s, 1), "loss": round(float(metrics["loss"]), 4),
          "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
          "jax": jax.__version__}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True)
  p.add_argument("--batches", default="", help="comma-separated global batch sizes")
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--steps", type=int, default=30)
  args, overrides = p.parse_known_args()     # + --config.key=value overrides
  batches = [int(b) for b in args.batches.split(",") if b] or [None]
  for b in batches:
    extra = [] if b is None else [f"--config.batch_size={b}"]
    config = load_config(args.config, overrides + extra)
    print(json.dumps({"part": "mfu_step", "config": args.config,
                      **measure(config, args.warmup, args.steps)}), flush=True)


if __name__ == "__main__":
  main()
