"""Magnitude pruning vs accuracy on digits: fine-tune the float digits classifier with
config.finetune.prune at several sparsities and measure held-out accuracy.

  python benchmarks/prune.py [--base DIR] [--steps 300] [--sparsities 0,0.3,0.5,0.7,0.9]
      [--scope global] [--root DIR]

--base: a trained configs/finetune_digits.py workdir (default: the float digits model of
benchmarks/quantize.py; trained here for 600 steps when absent). Each sparsity fine-tunes it
for --steps steps (lr 3e-4) with the gradual (cubic) schedule from step 0 to 60% of the
steps, masks held after, targets = the encoder blocks' kernels (the default); sparsity 0
is the same fine-tune without pruning. One JSON line per sparsity: the target, the
measured sparsity of the saved checkpoint (what `mmjax eval` reports), accuracy on the
held-out 20%, seconds.
"""
import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import mmjax  # noqa: E402  pylint: disable=g-import-not-at-top
from mmjax.tuning.prune import DEFAULTS, measured_sparsity  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--base", default="/tmp/mmjax_bench_quantize/digits/float")
  p.add_argument("--root", default="/tmp/mmjax_bench_prune")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--sparsities", default="0,0.3,0.5,0.7,0.9")
  p.add_argument("--scope", default="global", choices=("global", "layer"))
  args = p.parse_args()
  base = pathlib.Path(args.base)
  if not (base / "checkpoints").is_dir():
    mmjax.train(mmjax.load_config("finetune_digits"), base, progress=False)
  for s in (float(x) for x in args.sparsities.split(",")):
    work = pathlib.Path(args.root) / f"{args.scope}_{s:g}"
    config = mmjax.load_config("finetune_digits", [
        f"--config.total_steps={args.steps}", "--config.optim.lr=3e-4",
        "--config.optim.warmup_steps=20", f"--config.finetune.prune.sparsity={s}",
        f"--config.finetune.prune.scope={args.scope}",
        f"--config.finetune.prune.end_step={int(0.6 * args.steps)}"])
    t = time.time()
    if not (work / "checkpoints").is_dir():
      mmjax.finetune(config, work, init=str(base), progress=False)
    got = mmjax.evaluate(None, work)
    zeros = measured_sparsity(mmjax.load(work).params, DEFAULTS["targets"])
    print(json.dumps({"sparsity": s, "scope": args.scope, "steps": args.steps,
                      "measured_sparsity": round(zeros["prune_sparsity"], 4),
                      "params_sparsity": round(zeros["params_sparsity"], 4),
                      "report_acc": round(got["report_acc"], 4),
                      "seconds": round(time.time() - t, 1)}), flush=True)


if __name__ == "__main__":
  main()
