"""`mmjax export` on the demo's model size: time to export, file sizes, and the CPU latency
of the exported functions (jax.export artifact, ONNX in onnxruntime) vs the live model.

  .venv/bin/python benchmarks/export.py [--repeats 20] [--batches 1,32]

An untrained configs/demo.py model (image, text and fusion towers at the demo's width,
embed_dim, plus an 8-class image classifier) written as a workdir at its init: latency does
not depend on the weights' values. Each measurement is the median of `repeats` calls after
2 warm-up rounds, the runners called in turn, in this one process. Prints one JSON line per
measurement, with the CPU model: compare the lines of one run with each other.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np

import mmjax
from mmjax.data.tokenizer import train_wordpiece
from mmjax.deploy import export as export_lib
from mmjax.io import workdir as workdir_lib
from mmjax.train.loop import _init_variables_fn
from mmjax.train.state import initial_state

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from demo_step import cpu_model  # noqa: E402  pylint: disable=g-import-not-at-top


def demo_workdir(path: pathlib.Path) -> pathlib.Path:
  config = mmjax.load_config("demo", ["--config.evals={}"])
  with config.unlocked():
    config.model.classifier = ml_collections.ConfigDict(dict(num_classes=8, input="image"))
  tok = train_wordpiece(["a small red circle left of a big blue square",
                         "a large green triangle above a white cross"] * 8, 128)
  model = mmjax.build_model(config, tok.vocab_size, mmjax.io.loading.special_ids(tok))
  fresh = _init_variables_fn(model, config, jax.random.PRNGKey(0))()
  workdir_lib.write_workdir(path, config, initial_state(config, fresh["params"]), {}, tok)
  return path


def median_ms(runs: dict, repeats: int) -> dict[str, float]:
  """Median ms of each of `runs` (name -> fn), called in turn `repeats` times: the runners
  share whatever else loads the machine alike."""
  times = {how: [] for how in runs}
  for i in range(repeats + 2):
    for how, fn in runs.items():
      start = time.perf_counter()
      fn()
      if i >= 2:                        # 2 warm-up rounds
        times[how].append(time.perf_counter() - start)
  return {how: round(1000 * statistics.median(t), 3) for how, t in times.items()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--batches", default="1,32")
  args = p.parse_args()
  cpu = cpu_model()
  emit = lambda **kw: print(json.dumps({**kw, "cpu": cpu}), flush=True)
  root = pathlib.Path(tempfile.mkdtemp(prefix="mmjax_export_bench_"))
  work = demo_workdir(root / "work")
  for fmt in ("stablehlo", "onnx"):
    start = time.perf_counter()
    meta = export_lib.export(work, root / fmt, fmt=fmt)
    files = {f.name: f.stat().st_size for f in sorted((root / fmt).iterdir())}
    emit(what="export", format=fmt, seconds=round(time.perf_counter() - start, 2),
         functions=sorted(meta["functions"]), platforms=meta.get("platforms", ["onnx"]),
         bytes=files)

  import onnxruntime as ort  # pylint: disable=g-import-not-at-top  # the onnx extra
  loaded = mmjax.load(work)
  model, variables = loaded.model(), jax.device_put(loaded.variables)
  exported = mmjax.load_exported(root / "stablehlo")
  live = {"image": jax.jit(lambda v, x: model.apply(v, x, method="encode_image")[0]),
          "text": jax.jit(lambda v, i, m: model.apply(v, i, m, method="encode_text")[0])}
  sessions = {n: ort.InferenceSession(str(root / "onnx" / f"{n}.onnx")) for n in live}
  rng = np.random.default_rng(0)
  for b in (int(x) for x in args.batches.split(",")):
    ids, mask = exported.text_rows(["a small red circle left of a big blue square"] * b)
    inputs = {"image": (rng.normal(size=(b, 32, 32, 3)).astype(np.float32),),
              "text": (ids, mask)}
    for name, xs in inputs.items():
      feeds = dict(zip([i.name for i in sessions[name].get_inputs()], xs))
      want = np.asarray(live[name](variables, *xs))
      runs = {"live_jit": lambda: np.asarray(live[name](variables, *xs)),
              "jax_export": lambda: exported.functions[name](*xs),
              "onnxruntime": lambda: sessions[name].run(None, feeds)[0]}
      for how, ms in median_ms(runs, args.repeats).items():
        emit(what="latency", function=name, batch=b, runner=how, ms=ms,
             max_abs_diff=float(np.abs(np.asarray(runs[how]()) - want).max()))


if __name__ == "__main__":
  main()
