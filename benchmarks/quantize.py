"""Post-training quantization (mmjax quantize): accuracy, checkpoint bytes and CPU latency of
the jitted forward, float vs int8-weight vs w8a8 (dynamic and calibrated static range).

  python benchmarks/quantize.py [--root DIR] [--digits-steps 600] [--demo-steps 400]
      [--models digits,demo,hf_vit] [--calibration-steps 8] [--latency-batch 64]

Trains (or reuses, when DIR/<model>/float has a checkpoint) the float models:
  digits  configs/finetune_digits.py (ViT width 96, depth 4, a 10-way classifier) from
          scratch; metric: accuracy on the held-out 20% (report_acc)
  demo    configs/demo.py for --demo-steps (a shortened demo; the zero-shot model);
          metrics: zero-shot colour / shape accuracy on held-out shapes
  hf_vit  a transformers ViTForImageClassification (width 96, depth 4, patch 4 on 32 px),
          saved with save_pretrained, then `mmjax finetune`d from that directory
          (init.towers: its tower, size and normalisation; a new 10-way head) with
          configs/finetune_digits.py for --digits-steps; metric as digits. Its weights are
          random-init (no hub downloads here): what it measures is the converted HF
          architecture (CLS pooling, HF's LayerNorm eps and GELU) under quantization.
then writes one quantized workdir per mode and prints one JSON line per (model, variant).
Latency: the median of 20 calls of the jitted forward (digits: classify; demo: the image
tower + projection, what zero-shot scores an image with) on one test batch, after
warm-up, the variants' calls interleaved so that they share the machine's load alike.
"""
import argparse
import functools
import json
import pathlib
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import mmjax  # noqa: E402  pylint: disable=g-import-not-at-top
from mmjax import data as mmdata  # noqa: E402  pylint: disable=g-import-not-at-top
from mmjax.deploy.quantize import dir_bytes, quantize  # noqa: E402

MODELS = {
    "digits": dict(config="finetune_digits", metrics=("report_acc",), method="classify"),
    "demo": dict(config="demo", metrics=("zeroshot_color_acc", "zeroshot_shape_acc"),
                 method="encode_image"),
    "hf_vit": dict(config="finetune_digits", metrics=("report_acc",), method="classify"),
}
# The Hugging Face ViT of `hf_vit`: the digits model's size in HF's architecture.
HF_VIT = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=4,
              num_attention_heads=4, image_size=32, patch_size=4, num_labels=10)
VARIANTS = (("int8-weight", 0), ("w8a8", 0), ("w8a8", None))   # None: --calibration-steps


def hf_vit_dir(path: pathlib.Path) -> pathlib.Path:
  """A random-init transformers ViTForImageClassification saved in `path` (once)."""
  if not (path / "config.json").is_file():
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**HF_VIT))
    model.eval().save_pretrained(path)
  return path


def train_float(name: str, work: pathlib.Path, steps: int) -> None:
  if (work / "checkpoints").is_dir() and any((work / "checkpoints").iterdir()):
    return
  overrides = [f"--config.total_steps={steps}"]
  if name == "hf_vit":     # the HF tower, size and normalisation; a new head
    hf = hf_vit_dir(work.parent / "hf")
    overrides += [f"--config.init.path={hf}", "--config.init.towers=True",
                  r"--config.init.ignore=^classifier\."]
  config = mmjax.load_config(MODELS[name]["config"], overrides)
  t = time.time()
  if name == "hf_vit":
    mmjax.finetune(config, work, progress=False)
  else:
    mmjax.train(config, work, progress=False)
  print(json.dumps({"model": name, "trained": str(work), "steps": steps,
                    "seconds": round(time.time() - t, 1)}), flush=True)


def latencies_ms(paths, method: str, batch_size: int, rounds: int = 20) -> list[float]:
  """Median ms of the jitted forward of each workdir in `paths` on one test batch, the
  calls interleaved (round-robin, after warm-up) so that every variant sees the same load
  of this shared machine."""
  runs = []
  for path in paths:
    got = mmjax.load(path)
    model, config = got.model(), got.config
    it = mmdata.make_iterator(config.data, "test", batch_size=batch_size, train=False,
                              tokenizer=got.tokenizer or mmdata.get_tokenizer(config.data))
    images = next(it)["image"]
    arg = {"image": images} if method == "classify" else images
    fn = jax.jit(functools.partial(model.apply, method=getattr(model, method)))
    variables = jax.device_put(got.variables)
    jax.block_until_ready(fn(variables, arg))
    runs.append((fn, variables, arg))
  times = [[] for _ in runs]
  for _ in range(rounds):
    for i, (fn, variables, arg) in enumerate(runs):
      t = time.perf_counter()
      jax.block_until_ready(fn(variables, arg))
      times[i].append(time.perf_counter() - t)
  return [1000 * float(np.median(t)) for t in times]


def params_bytes(path: pathlib.Path) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(mmjax.load(path).params)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--root", default="/tmp/mmjax_bench_quantize")
  p.add_argument("--models", default="digits,demo")
  p.add_argument("--digits-steps", type=int, default=600)
  p.add_argument("--demo-steps", type=int, default=400)
  p.add_argument("--calibration-steps", type=int, default=8)
  p.add_argument("--latency-batch", type=int, default=64)
  p.add_argument("--latency-only", action="store_true",
                 help="skip the evaluations (the workdirs exist already)")
  args = p.parse_args()
  root = pathlib.Path(args.root)
  for name in args.models.split(","):
    spec = MODELS[name]
    base = root / name / "float"
    train_float(name, base, args.demo_steps if name == "demo" else args.digits_steps)
    rows = [("float", 0, base)]
    for mode, steps in VARIANTS:
      steps = args.calibration_steps if steps is None else steps
      out = root / name / (f"{mode}" + (f"-static{steps}" if steps else ""))
      if not out.exists():
        quantize(base, out, mode, steps)
      rows.append((mode, steps, out))
    ms = latencies_ms([path for _, _, path in rows], spec["method"], args.latency_batch)
    for (mode, steps, path), latency in zip(rows, ms):
      row = {"model": name, "variant": mode, "calibration_steps": steps,
             "latency_ms": round(latency, 2), "latency_batch": args.latency_batch,
             "params_bytes": params_bytes(path),
             "checkpoint_bytes": dir_bytes(path / "checkpoints")}
      if not args.latency_only:
        t = time.time()
        metrics = mmjax.evaluate(None, path)
        row.update({m: round(metrics[m], 4) for m in spec["metrics"]},
                   eval_seconds=round(time.time() - t, 1))
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
