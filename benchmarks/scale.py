"""Scan over layers and remat at CLIP scale: compile time and per-device temp memory.

  .venv/bin/python benchmarks/scale.py [--models B/16,L/14] [--batches 32,128,512]
      [--remats none,dots_with_no_batch_dims_saveable,full] [--step] [--breakdown]
      [--dtype bfloat16] [--no-unrolled]

The model is a CLIP with a ViT image tower (B/16 or L/14, 224 px) and a text tower
of size B (77 tokens, 49408-token vocabulary), built by `build_model` from a config as
a run would; the program is one train step: contrastive loss, gradients, AdamW update.
Nothing runs at the large batches: each measurement lowers and compiles the step on
abstract inputs (jax.ShapeDtypeStruct), so even a CPU measures them (with its own
compiler: an accelerator's buffers differ). Prints one JSON line per measurement:

  {"what": "compile", "model", "scan", "remat", "batch", "compile_s", "compile_cpu_s",
   "lower_s", "lower_cpu_s", "hlo_ops", "fusions", "distinct_fusions", "while_loops"}
      unrolled vs scanned compile time of the same step (remat none, the first batch);
      XLA's compile, and Python tracing + lowering before it, wall and CPU seconds; the
      optimised HLO's instructions, fusions, fusions that differ in more than their
      names (XLA:CPU generates code once for identical ones) and while loops;
  {"what": "compile_part", "part", ...the same keys} with --breakdown: where the step's
      compile time goes, unrolled and scanned: "forward" (the loss only), "grad" (loss
      and gradients), "update" (the AdamW update alone), and "one_block": the whole step
      of the same model with one block per tower (unrolled), what any layout of the
      blocks has to compile besides them;
  {"what": "memory", "model", "remat", "batch", "temp_mb", "args_mb", "scan": true}
      `compiled.memory_analysis()`: temp_mb = XLA's temporaries (activations kept for
      the backward pass and workspace), args_mb = params + optimizer state + batch;
  {"what": "step", "model", "batch", "step_s"} with --step: one step run at the first
      batch on the backend present (scanned, remat none; median of 3 after one warm-up).

XLA compiles per device; on CPU there is one device, so "per device" is the whole batch.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from mmjax import objectives  # noqa: E402
from mmjax.models import build_model  # noqa: E402
from mmjax.models import layers  # noqa: E402

VOCAB, TEXT_LEN, IMAGE_SIZE = 49408, 77, 224


PARTS = ("step", "forward", "grad", "update", "one_block")


def clip_config(image_variant: str, *, scan: bool, remat: str, dtype: str, depth: int = 0):
  """CLIP with the image tower `image_variant` ("B/16", "L/14") and a B text tower
  (`depth` > 0: that many blocks in each tower instead)."""
  blocks = {"depth": depth} if depth else {}
  tower = lambda **kw: ml_collections.ConfigDict({"pool": "cls", "act": "quick_gelu",
                                                  **kw, **blocks})
  return ml_collections.ConfigDict(dict(
      model=dict(image=tower(variant=image_variant, pre_norm=True),
                 text=tower(variant="B", vocab_size=VOCAB, max_len=TEXT_LEN, pool="eos",
                            causal=True),
                 embed_dim=768 if image_variant.startswith("L") else 512, dtype=dtype,
                 scan_layers=scan, remat=remat),
      data=dict(image_size=IMAGE_SIZE, max_len=TEXT_LEN),
      objectives=dict(contrastive=1.0)))


def abstract_batch(batch: int) -> dict[str, jax.ShapeDtypeStruct]:
  return {"image": jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32),
          "text": jax.ShapeDtypeStruct((batch, TEXT_LEN), jnp.int32),
          "text_mask": jax.ShapeDtypeStruct((batch, TEXT_LEN), jnp.int32)}


def train_step(model, tx):
  def step(params, opt_state, batch, rng):
    def loss_fn(p):
      out = model.apply({"params": p}, batch, train=True, rngs={"dropout": rng})
      return objectives.contrastive(out, batch)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def lowered(image_variant: str, batch: int, *, scan: bool, remat: str, dtype: str,
            part: str = "step"):
  """The jitted step (or a `part` of it, see PARTS) lowered on abstract inputs."""
  config = clip_config(image_variant, scan=scan, remat=remat, dtype=dtype,
                       depth=1 if part == "one_block" else 0)
  model = build_model(config)
  tx = optax.adamw(1e-3)
  example = {k: jnp.zeros((1, *v.shape[1:]), v.dtype) for k, v in abstract_batch(1).items()}
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example))["params"]
  opt_state = jax.eval_shape(tx.init, params)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  data = abstract_batch(batch)
  if part in ("step", "one_block"):
    return jax.jit(train_step(model, tx), donate_argnums=(0, 1)).lower(params, opt_state,
                                                                       data, rng)
  if part == "update":
    def update(grads, opt_state, params):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    return jax.jit(update, donate_argnums=(1, 2)).lower(params, opt_state, params)

  def loss_fn(p, batch, rng):
    out = model.apply({"params": p}, batch, train=True, rngs={"dropout": rng})
    return objectives.contrastive(out, batch)[0]
  fn = loss_fn if part == "forward" else jax.value_and_grad(loss_fn)
  return jax.jit(fn).lower(params, data, rng)


def hlo_stats(compiled) -> dict[str, int]:
  """Counts in the optimised HLO: instructions, fusions, distinct fusions (their fused
  computations compared with names and metadata left out), while loops."""
  text = compiled.as_text()
  computations = re.split(r"\n(?=\S)", text)
  bodies = {}
  for comp in computations:
    head, *lines = comp.strip().split("\n")
    plain = (re.sub(r"%[\w.\-]+", "%", re.sub(r",? ?metadata=\{[^}]*\}", "", line))
             for line in lines)
    bodies[head.split(" ")[0].lstrip("%")] = "\n".join(plain)
  called = re.findall(r" fusion\(.*calls=%([\w.\-]+)", text)
  return {"hlo_ops": len(re.findall(r"^\s+(?:ROOT )?%\S+ = ", text, re.M)),
          "fusions": len(called), "distinct_fusions": len({bodies[c] for c in called}),
          "while_loops": len(re.findall(r" while\(", text))}


def compile_time(image_variant, batch, *, scan, remat, dtype, part="step"
                 ) -> tuple[dict, object]:
  """({"compile_s": wall seconds, "compile_cpu_s": this process's CPU seconds, the same
  of tracing + lowering: "lower_s", "lower_cpu_s", and `hlo_stats`}, compiled) of the
  step or its `part`. On a shared machine
  the CPU seconds are the fairer figure: the wall clock also counts the time other
  processes held the cores."""
  wall, cpu = time.perf_counter(), time.process_time()
  low = lowered(image_variant, batch, scan=scan, remat=remat, dtype=dtype, part=part)
  lower = {"lower_s": round(time.perf_counter() - wall, 2),
           "lower_cpu_s": round(time.process_time() - cpu, 2)}
  wall, cpu = time.perf_counter(), time.process_time()
  compiled = low.compile()
  return {**lower, "compile_s": round(time.perf_counter() - wall, 2),
          "compile_cpu_s": round(time.process_time() - cpu, 2), **hlo_stats(compiled)}, compiled


def step_time(image_variant: str, batch: int, dtype: str) -> float:
  config = clip_config(image_variant, scan=True, remat="none", dtype=dtype)
  model, tx = build_model(config), optax.adamw(1e-3)
  r = np.random.default_rng(0)
  data = {"image": jnp.asarray(r.normal(size=(batch, IMAGE_SIZE, IMAGE_SIZE, 3)), jnp.float32),
          "text": jnp.asarray(r.integers(1, VOCAB, (batch, TEXT_LEN)), jnp.int32),
          "text_mask": jnp.ones((batch, TEXT_LEN), jnp.int32)}
  params = jax.jit(model.init)(jax.random.PRNGKey(0), data)["params"]
  opt_state = tx.init(params)
  step = jax.jit(train_step(model, tx), donate_argnums=(0, 1))
  rng = jax.random.PRNGKey(1)
  times = []
  for _ in range(4):
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, data, rng)
    loss.block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times[1:])


def emit(**record) -> None:
  print(json.dumps(dict(record, backend=jax.default_backend(),
                        device=jax.devices()[0].device_kind)), flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="B/16,L/14")
  parser.add_argument("--batches", default="32,128,512")
  parser.add_argument("--remats", default="none,dots_with_no_batch_dims_saveable,full")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--no-unrolled", action="store_true",
                      help="skip the unrolled compile (the slowest measurement)")
  parser.add_argument("--step", action="store_true", help="also run one step at the first batch")
  parser.add_argument("--breakdown", action="store_true",
                      help="also compile the parts of the step (PARTS), unrolled and scanned")
  parser.add_argument("--autodiff-activations", action="store_true",
                      help="the MLP activations as plain formulas that autodiff "
                           "differentiates (what layers.keeps_input replaced)")
  args = parser.parse_args(argv)
  if args.autodiff_activations:
    layers.ACTIVATIONS.update(layers.FORMULAS)
  models, remats = args.models.split(","), args.remats.split(",")
  batches = [int(b) for b in args.batches.split(",")]
  for name in models:
    done = {}    # (remat, batch) -> the scanned step compiled for the compile-time line
    for scan in ([True] if args.no_unrolled else [False, True]):
      times, compiled = compile_time(name, batches[0], scan=scan, remat="none",
                                     dtype=args.dtype)
      emit(what="compile", model=name, scan=scan, remat="none", batch=batches[0],
           dtype=args.dtype, **times)
      if scan:
        done["none", batches[0]] = compiled
    if args.breakdown:
      for part in PARTS[1:]:
        for scan in ([False] if part == "one_block" else [False, True]):
          times, _ = compile_time(name, batches[0], scan=scan, remat="none", dtype=args.dtype,
                                  part=part)
          emit(what="compile_part", part=part, model=name, scan=scan, remat="none",
               batch=batches[0], dtype=args.dtype, **times)
    for remat in remats:
      for batch in batches:
        compiled = done.get((remat, batch))
        times = {}
        if compiled is None:
          times, compiled = compile_time(name, batch, scan=True, remat=remat, dtype=args.dtype)
        mem = compiled.memory_analysis()
        emit(what="memory", model=name, scan=True, remat=remat, batch=batch, dtype=args.dtype,
             temp_mb=round(mem.temp_size_in_bytes / 2**20, 1),
             args_mb=round(mem.argument_size_in_bytes / 2**20, 1), **times)
    if args.step:
      emit(what="step", model=name, batch=batches[0], dtype=args.dtype,
           step_s=round(step_time(name, batches[0], args.dtype), 3))


if __name__ == "__main__":
  main()
