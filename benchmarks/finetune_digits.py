"""Every fine-tuning strategy on scikit-learn digits, from one pretrained checkpoint.

  python benchmarks/finetune_digits.py [--base clip|shapes] [--steps 300] [--pretrain-steps 600] [--workdir DIR]

1. Pretrain the configs/finetune_digits.py ViT once, as `--base` says: `clip`
   (default; contrastive on digits' train images + captions) or `shapes` (a shape
   classifier on the built-in rendered shapes: another domain).
2. Fine-tune it on digits with each strategy (configs/finetune_digits.py:<strategy>,
   classifier re-initialised), each in its own process, and measure test accuracy on
   the held-out 20%, trainable params, wall time (incl. compilation) and peak RSS.
3. Write the table into BENCHMARKS.md between this script's markers (the rest of the
   file is left as it is).
"""
import argparse
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from configs.finetune_digits import CLIP_ONLY  # noqa: E402  pylint: disable=g-import-not-at-top
STRATEGIES = ("full", "partial", "per_modality", "linear_probe", "progressive", "lora",
              "adapters")
MARKS = lambda base: (f"<!-- finetune_digits[{base}]: begin -->",
                      f"<!-- finetune_digits[{base}]: end -->")

# Two bases for the same image tower. "clip": CLIP-style contrastive pretraining on
# digits' train images and their captions (in domain: the captions name the digit, so
# the features fit the task); "shapes": a 4-way shape classifier on rendered shapes
# (out of domain: handwriting shares little with it).
PRETRAIN = {
    "clip": r"""
import json, sys, mmjax
c = mmjax.load_config("finetune_digits:clip_pretrain", ["--config.total_steps=" + sys.argv[2]])
print(json.dumps(mmjax.train(c, sys.argv[1], progress=False)))
""",
    "shapes": r"""
import json, sys, mmjax, ml_collections
from configs.finetune_digits import get_config
c = get_config()
c.total_steps = int(sys.argv[2])
with c.data.unlocked():
  c.data.update(dict(name="shapes", train_size=20000, eval_size=512, num_objects=(1, 1)))
c.model.classifier.num_classes = 4
c.objective_options.classify.label = "shape"
c.evals.report.label = "shape"
print(json.dumps(mmjax.train(c, sys.argv[1], progress=False)))
""",
}
# Base params the image classifier does not use.
IGNORE = {"clip": CLIP_ONLY, "shapes": r"^classifier/"}

FINETUNE = r"""
import json, resource, sys, time, logging, mmjax
from mmjax.config import load_config
from mmjax.tuning import make_plan
t0 = time.time()
c = load_config("finetune_digits:" + sys.argv[2], ["--config.total_steps=" + sys.argv[4],
                "--config.init.ignore=" + sys.argv[5]])
handler = logging.StreamHandler(); logging.getLogger("mmjax").addHandler(handler)
logging.getLogger("mmjax").setLevel(logging.INFO)
result = mmjax.finetune(c, sys.argv[1], init=sys.argv[3], progress=False)
result["wall_s"] = time.time() - t0
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def run(code, *args):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                     text=True, cwd=ROOT, env=env)
  if r.returncode:
    sys.exit(f"failed: {args}\n{r.stderr[-3000:]}")
  trained = re.search(r"finetune \w+: (\d+) of (\d+) params train", r.stderr)
  return json.loads(r.stdout.splitlines()[-1]), trained


BASE_TEXT = {
    "clip": "pretrained {n} steps CLIP-style (contrastive, with a 2-block text tower) on "
            "digits' train images and captions — in domain: the captions name the digit",
    "shapes": "pretrained {n} steps as a 4-way shape classifier on `shapes` — out of "
              "domain: rendered shapes, not handwriting",
}


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--base", choices=sorted(PRETRAIN), default="clip")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--pretrain-steps", type=int, default=600)
  p.add_argument("--workdir", default=str(ROOT / "workdirs" / "bench_finetune_digits"))
  p.add_argument("--only", default="", help="comma-separated strategies (default: all)")
  args = p.parse_args()
  work = pathlib.Path(args.workdir) / args.base
  base = work / "pretrained"
  if not (base / "checkpoints").is_dir():
    t = time.time()
    run(PRETRAIN[args.base], base, args.pretrain_steps)
    print(f"pretrained ({args.base}) in {time.time() - t:.0f} s", flush=True)
  rows = []
  for s in (args.only.split(",") if args.only else STRATEGIES):
    out = work / s
    if out.exists():
      subprocess.run(["rm", "-rf", str(out)], check=True)
    got, trained = run(FINETUNE, out, s, base, args.steps, IGNORE[args.base])
    n_train, n_all = int(trained.group(1)), int(trained.group(2))
    rows.append((s, got["report_acc"], n_train, n_all, got["wall_s"], got["peak_rss_mb"]))
    print(f"{s:14s} acc {got['report_acc']:.4f}  trains {n_train}/{n_all}  "
          f"{got['wall_s']:.0f} s  {got['peak_rss_mb']:.0f} MB", flush=True)
  table = ["| strategy | test acc | trainable params | % of model | wall time (s) | peak RSS (MB) |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  table += [f"| {s} | {acc:.4f} | {n:,} | {100 * n / total:.2f}% | {t:.0f} | {mb:.0f} |"
            for s, acc, n, total, t, mb in rows]
  begin, end = MARKS(args.base)
  section = "\n".join([
      begin, f"### Base: {args.base}", "",
      f"ViT (width 96, depth 4, patch 4, GAP) {BASE_TEXT[args.base].format(n=args.pretrain_steps)}; "
      f"then {args.steps} steps (batch 64, AdamW, lr 1e-3 cosine) "
      f"on digits' train split with each strategy, classifier "
      f"new; accuracy on the held-out 20% (360 scans, 32x32). Wall time includes compilation "
      f"and the evaluation; peak RSS of the process. {time.strftime('%Y-%m-%d')}, "
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with "
      f"other work while measured.", "", *table, end])
  md = ROOT / "BENCHMARKS.md"
  text = md.read_text() if md.exists() else "# Benchmarks\n"
  if begin in text:
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text,
                  flags=re.S)
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  md.write_text(text)
  print(f"wrote {md}")


if __name__ == "__main__":
  main()
