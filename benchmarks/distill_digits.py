"""Knowledge distillation on scikit-learn digits with a small label budget.

  python benchmarks/distill_digits.py [--budget 150] [--steps 400] [--workdir DIR]

1. Train the configs/distill_digits.py teacher (the larger ViT) on all of digits' train
   split, once (a teacher already in WORKDIR/teacher is reused).
2. Train the small student on a fixed seeded subset of `--budget` train examples, alone
   (hard labels) and distilled (the same subset, hard labels + the teacher's softened
   outputs), each in its own process and with a few init seeds, and measure accuracy on
   the held-out 20%.
3. Write the table into BENCHMARKS.md between this script's markers (the rest of the
   file is left as it is).
"""
import argparse
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from configs import distill_digits  # pylint: disable=g-import-not-at-top,wrong-import-position

BEGIN, END = "<!-- distill_digits: begin -->", "<!-- distill_digits: end -->"

TRAIN = r"""
import json, sys, time, mmjax
from mmjax.config import load_config
t0 = time.time()
c = load_config("distill_digits:" + sys.argv[2], sys.argv[3:])
result = mmjax.train(c, sys.argv[1], progress=False)
result["wall_s"] = time.time() - t0
print(json.dumps(result))
"""


def train(workdir: pathlib.Path, role: str, *overrides: str) -> dict:
  """One fresh run of the config's `role` in its own process; its final metrics."""
  shutil.rmtree(workdir, ignore_errors=True)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  r = subprocess.run([sys.executable, "-c", TRAIN, str(workdir), role, *overrides],
                     capture_output=True, text=True, cwd=ROOT, env=env)
  if r.returncode:
    sys.exit(f"failed: {role} {overrides}\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.splitlines()[-1])


def train_teacher(workdir: pathlib.Path) -> dict:
  """The teacher's final metrics, training it unless `workdir` already holds one (delete
  the folder after changing the teacher's config)."""
  done = workdir / "result.json"
  if done.is_file():
    return json.loads(done.read_text())
  got = train(workdir, "teacher")
  done.write_text(json.dumps(got))
  return got


def write_section(section: str) -> pathlib.Path:
  md = ROOT / "BENCHMARKS.md"
  text = md.read_text() if md.exists() else "# Benchmarks\n"
  if BEGIN in text:
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text,
                  flags=re.S)
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  md.write_text(text)
  return md


def markdown(args, rows) -> str:
  """This benchmark's BENCHMARKS.md section, markers included."""
  steps = args.steps or distill_digits.get_config("student").total_steps
  table = ["| run | train labels | test acc per seed | mean test acc | wall time per run (s) |",
           "| --- | ---: | --- | ---: | ---: |"]
  table += [f"| {name} | {n} | {' / '.join(f'{a:.4f}' for a in accs)} | "
            f"{sum(accs) / len(accs):.4f} | {sum(walls) / len(walls):.0f} |"
            for name, n, accs, walls in rows]
  return "\n".join([
      BEGIN, "## Knowledge distillation on digits (`benchmarks/distill_digits.py`)", "",
      f"configs/distill_digits.py: a ViT teacher (width 96, depth 4, patch 4, GAP) trained "
      f"on all 1437 train scans; a small student ViT (width 64, depth 2) trained {steps} "
      f"steps on a fixed seeded stratified subset of {args.budget} of them "
      f"(`data.train_examples`), alone and distilled (objectives classify "
      f"{1 - args.weight:g} + distill {args.weight:g}, temperature {args.temperature:g}; the "
      f"teacher sees the same {args.budget} augmented images, nothing else). Each student "
      f"runs with init seeds {args.seeds} (`config.seed`; the subset is the same). "
      f"Accuracy on the held-out 20% (360 scans, 32x32). Wall time includes compilation "
      f"and the evaluation. {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cores, shared with other work while measured.", "", *table, END])


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--budget", type=int, default=distill_digits.STUDENT_EXAMPLES,
                 help="labelled train examples the student sees")
  p.add_argument("--steps", type=int, default=0, help="student steps (default: the config's)")
  p.add_argument("--temperature", type=float, default=distill_digits.TEMPERATURE)
  p.add_argument("--weight", type=float, default=distill_digits.DISTILL_WEIGHT,
                 help="objectives: classify 1 - w, distill w")
  p.add_argument("--seeds", default="0,1,2", help="student init seeds (config.seed)")
  p.add_argument("--workdir", default=str(ROOT / "workdirs" / "bench_distill_digits"))
  p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
  args = p.parse_args()
  work = pathlib.Path(args.workdir)
  teacher = work / "teacher"
  got = train_teacher(teacher)
  print(f"teacher   acc {got['report_acc']:.4f}  {got['wall_s']:.0f} s", flush=True)
  student = [f"--config.data.train_examples={args.budget}"]
  if args.steps:
    student.append(f"--config.total_steps={args.steps}")
  distill = [f"--config.distill.teacher={teacher}",
             f"--config.distill.temperature={args.temperature}",
             f"--config.objectives.classify={round(1 - args.weight, 6)}",
             f"--config.objectives.distill={args.weight}"]
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = [("teacher (all labels)", "all", [got["report_acc"]], [got["wall_s"]])]
  for name, role, extra in (("student alone", "student", []),
                            ("student distilled", "distill", distill)):
    accs, walls = [], []
    for seed in seeds:
      got = train(work / f"{role}_{seed}", role, *student, *extra, f"--config.seed={seed}")
      accs.append(got["report_acc"])
      walls.append(got["wall_s"])
      print(f"{name:18s} seed {seed}  acc {accs[-1]:.4f}  {walls[-1]:.0f} s", flush=True)
    rows.append((name, args.budget, accs, walls))
  for name, _, accs, _ in rows:
    print(f"{name:20s} mean acc {sum(accs) / len(accs):.4f}")
  if args.no_write:
    return
  print(f"wrote {write_section(markdown(args, rows))}")


if __name__ == "__main__":
  main()
