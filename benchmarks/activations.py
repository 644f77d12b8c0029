"""The gradient of a scanned encoder with the MLP activations as `layers.keeps_input`
custom VJPs vs as their plain formulas (`layers.FORMULAS`, which autodiff differentiates
keeping its intermediates): seconds per jitted gradient, the two alternating in one
process so that they share the machine's load alike. Prints JSON lines.

  python benchmarks/activations.py [--depth 2] [--batch 8] [--repeats 7] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from mmjax.models import layers  # noqa: E402


def grad_seconds(act: str, fn, dtype, depth: int, batch: int, repeats: int) -> float:
  """Median seconds of one jitted gradient of a B/16-width scanned Encoder (197 tokens)."""
  custom = layers.ACTIVATIONS[act]
  layers.ACTIVATIONS[act] = fn
  try:
    encoder = layers.Encoder(depth=depth, heads=12, mlp_dim=3072, act=act, scan_layers=True,
                             dtype=dtype)
    x = jnp.ones((batch, 197, 768), jnp.float32)
    params = encoder.init(jax.random.PRNGKey(0), x)
    grad = jax.jit(jax.grad(
        lambda p, x: jnp.sum(encoder.apply(p, x).astype(jnp.float32) ** 2)))
    jax.block_until_ready(grad(params, x))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(grad(params, x))
      times.append(time.perf_counter() - start)
    return statistics.median(times)
  finally:
    layers.ACTIVATIONS[act] = custom


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--acts", default="quick_gelu,gelu")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--rounds", type=int, default=2)
  args = p.parse_args(argv)
  for dtype in args.dtypes.split(","):
    for act in args.acts.split(","):
      pairs = [(grad_seconds(act, layers.ACTIVATIONS[act], jnp.dtype(dtype), args.depth,
                             args.batch, args.repeats),
                grad_seconds(act, layers.FORMULAS[act], jnp.dtype(dtype), args.depth,
                             args.batch, args.repeats)) for _ in range(args.rounds)]
      print(json.dumps(dict(act=act, dtype=dtype, depth=args.depth, batch=args.batch,
                            keeps_input_s=[round(a, 3) for a, _ in pairs],
                            autodiff_s=[round(b, 3) for _, b in pairs])), flush=True)


if __name__ == "__main__":
  main()
