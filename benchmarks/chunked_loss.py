"""Compiled per-device temp memory of the gathered vs chunked contrastive / sigmoid losses.

The loss and its gradients w.r.t. the embeddings, logit scale and bias, jitted over a
(data N) mesh of CPU devices with the batch split over them; XLA's memory_analysis of
each compiled program. Prints one JSON line per (loss, version). Nothing is run, so
the batch can be as large as on an accelerator pod:

  python benchmarks/chunked_loss.py [--devices 8] [--batch 8192] [--dim 512] [--len 16]
"""
import argparse
import os
import sys

if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batch", type=int, default=8192)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--len", type=int, default=16, help="caption tokens")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from mmjax import objectives, parallel  # noqa: E402


def compiled_memory(name: str, chunked: bool, mesh, batch: int, dim: int, length: int):
  def loss(params, ids):
    outputs = dict(image_emb=params["img"], text_emb=params["txt"],
                   logit_scale=params["scale"], logit_bias=params["bias"])
    return objectives.get(name)(outputs, {"text": ids}, chunked=chunked)[0]

  rows = NamedSharding(mesh, parallel.BATCH_SPEC)
  params = dict(img=jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows),
                txt=jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows),
                scale=jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P())),
                bias=jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P())))
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)
  step = jax.jit(parallel.in_mesh(jax.value_and_grad(loss), mesh))
  t0 = time.time()
  mem = step.lower(params, ids).compile().memory_analysis()
  return dict(loss=name, chunked=chunked, devices=mesh.size, batch=batch, dim=dim,
              temp_mb=round(mem.temp_size_in_bytes / 2**20, 1),
              argument_mb=round(mem.argument_size_in_bytes / 2**20, 1),
              compile_s=round(time.time() - t0, 1))


def main():
  mesh = parallel.make_mesh({"data": args.devices})
  for name in ("contrastive", "sigmoid"):
    for chunked in (False, True):
      print(json.dumps(compiled_memory(name, chunked, mesh, args.batch, args.dim, args.len)),
            flush=True)


if __name__ == "__main__":
  main()
