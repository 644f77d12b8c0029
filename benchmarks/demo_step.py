"""What the demo's time goes to: its train step under config variants, and rendering.

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/demo_step.py \
      [--steps 40] ["--variant=--config.objectives={'contrastive': 1.0}" ...] [--render]

For configs/demo.py and each variant (overrides separated by spaces), in this
process and one after another: the jitted train step's median ms on a fixed batch
and with batches from the data pipeline (the loop's own `setup` / `make_step`), after
3 warm-up steps. `--render` also times rendering the demo's training images into an
empty cache. Prints one JSON line per measurement, with the CPU model: compare the
lines of one run with each other, not with another machine's.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import tempfile
import time

import jax
import numpy as np

import mmjax
from mmjax import data, parallel
from mmjax.train.loop import make_step, setup


def cpu_model() -> str:
  out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  return next((line.split(":", 1)[1].strip() for line in out.splitlines()
               if line.startswith("Model name")), platform.processor())


def step_ms(overrides: list[str], steps: int) -> dict:
  config = mmjax.load_config("demo", overrides + ["--config.evals={}"])
  run = setup(config)
  it = data.make_iterator(config.data, "train", batch_size=config.batch_size, train=True,
                          tokenizer=run.tokenizer, source=run.sources.get(config.data, "train"))
  step, state = make_step(run), run.state
  fixed = parallel.device_batch(next(it), run.mesh)
  for _ in range(3):
    state, _ = step(state, fixed)
  times = {"fixed": [], "pipeline": []}
  for kind in times:
    for _ in range(steps):
      t = time.perf_counter()
      batch = fixed if kind == "fixed" else parallel.device_batch(next(it), run.mesh)
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times[kind].append(time.perf_counter() - t)
  return {f"{k}_ms": round(1000 * float(np.median(v)), 1) for k, v in times.items()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--variant", action="append", default=[],
                 help="overrides for one variant, e.g. \"--config.objectives={'contrastive': 1.0}\"")
  p.add_argument("--render", action="store_true", help="also time rendering the train images")
  args = p.parse_args()
  common = {"cpu": cpu_model(), "jax": jax.__version__}
  for variant in [""] + args.variant:
    # One variant may hold several overrides: split before each --config.
    got = step_ms(re.split(r"\s+(?=--config\.)", variant.strip()) if variant else [],
                  args.steps)
    print(json.dumps({"bench": "demo_step", "variant": variant or "configs/demo.py", **got,
                      **common}), flush=True)
  if args.render:
    with tempfile.TemporaryDirectory() as cache:
      config = mmjax.load_config("demo", [f"--config.data.cache_dir={cache}"])
      t = time.perf_counter()
      data.build_source(config.data, "train")
      print(json.dumps({"bench": "demo_render", "images": config.data.train_size,
                        "seconds": round(time.perf_counter() - t, 1), **common}), flush=True)


if __name__ == "__main__":
  main()
