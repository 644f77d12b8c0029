"""The own-data recipe (configs/classify_files.py) against scikit-learn's RBF SVC on raw
pixels, on the same split, as a user would run it.

  python benchmarks/classify_digits.py [--towers vit,resnet] [--data FOLDER] [--workdir DIR]

1. Without --data: write scikit-learn's digits (1797 real 8x8 scans) as PNG files in the
   ImageFolder layout root/{train,test}/<digit name>/N.png, split as mmjax's built-in
   `digits` source splits them (a seeded stratified 80/20). With --data: that folder
   (root/train + root/test).
2. Fit SVC(kernel="rbf", gamma="scale") on the train images' raw grey pixels at their
   stored size, scaled to [0, 1]; score the test images.
3. `mmjax finetune --data root --workdir ...` once per tower (the recipe's defaults, from
   scratch, `tower=resnet` for the ResNet), in its own process; read the report accuracy
   and wall time (compilation and evaluation included).
4. Write the table into BENCHMARKS.md between this script's markers, with the CPU model.
"""
import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKS = ("<!-- classify_digits: begin -->", "<!-- classify_digits: end -->")


def write_digits(root: pathlib.Path) -> None:
  from sklearn.datasets import load_digits
  from mmjax.data.digits import DIGIT_NAMES, split_indices
  bunch = load_digits()
  for split in ("train", "test"):
    for i in split_indices(0, split, bunch.target):
      folder = root / split / DIGIT_NAMES[bunch.target[i]]
      folder.mkdir(parents=True, exist_ok=True)
      pixels = np.round(bunch.images[i] * (255 / 16)).astype(np.uint8)
      Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")


def read_split(root: pathlib.Path, split: str):
  """(grey pixels [N, H*W] in [0, 1], labels [N]) of root/split/<class>/*, classes sorted."""
  classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
  x, y = [], []
  for label, name in enumerate(classes):
    for f in sorted((root / split / name).iterdir()):
      with Image.open(f) as image:
        x.append(np.asarray(image.convert("L"), np.float32).ravel() / 255)
      y.append(label)
  return np.stack(x), np.array(y)


def svc_accuracy(root: pathlib.Path) -> tuple[float, float]:
  from sklearn.svm import SVC
  (xtr, ytr), (xte, yte) = read_split(root, "train"), read_split(root, "test")
  t = time.time()
  acc = float((SVC(kernel="rbf", gamma="scale").fit(xtr, ytr).predict(xte) == yte).mean())
  return acc, time.time() - t


def run_recipe(root: pathlib.Path, workdir: pathlib.Path, tower: str) -> dict:
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [str(pathlib.Path(sys.executable).parent / "mmjax"), "finetune", "--no-progress",
         "--config", f"classify_files:{root},tower={tower}", "--workdir", str(workdir)]
  t = time.time()
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if r.returncode:
    sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
  out = json.loads(r.stdout.splitlines()[-1])
  out["wall_s"] = time.time() - t
  out["config"] = json.loads((workdir / "config.json").read_text())
  return out


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return re.search(r"Model name:\s*(.+)", out).group(1).strip()
  except (OSError, AttributeError):
    return "unknown CPU"


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--towers", default="vit,resnet")
  p.add_argument("--data", default="", help="a folder root/{train,test}/<class>/* (default: "
                                            "digits written as PNGs)")
  p.add_argument("--workdir", default=str(ROOT / "workdirs" / "bench_classify_digits"))
  args = p.parse_args()
  work = pathlib.Path(args.workdir)
  root = pathlib.Path(args.data) if args.data else work / "digits_png"
  if not args.data and not (root / "test").is_dir():
    write_digits(root)
  svc, svc_s = svc_accuracy(root)
  print(f"SVC (rbf, raw pixels) acc {svc:.4f} in {svc_s:.1f} s", flush=True)
  rows = []
  for tower in args.towers.split(","):
    got = run_recipe(root, work / tower, tower)
    c = got["config"]
    image = c["model"]["image"]
    what = (f"ResNet-{image['variant']} (stem width {image['width']}, {image['norm']} norm)"
            if image.get("type") == "resnet" else
            f"ViT (width {image['width']}, depth {image['depth']}, patch {image['patch']})")
    rows.append((what, got["report_acc"], c["total_steps"], c["epochs"],
                 c["data"]["image_size"], got["wall_s"]))
    print(f"{tower}: acc {got['report_acc']:.4f}  {c['total_steps']} steps  "
          f"{got['wall_s']:.0f} s", flush=True)
  data = args.data or ("scikit-learn digits as 8x8 PNGs (1437 train / 360 test, the split "
                       "of the built-in `digits`)")
  table = ["| model | test acc | vs SVC | steps (epochs) | image size | wall time (s) |",
           "| --- | ---: | ---: | ---: | ---: | ---: |",
           f"| RBF SVC on raw pixels (scikit-learn, gamma=scale) | {svc:.4f} | — | — | "
           f"stored size | {svc_s:.1f} |"]
  table += [f"| {what} | {acc:.4f} | {acc - svc:+.4f} | {steps} ({ep:g}) | {size} | {t:.0f} |"
            for what, acc, steps, ep, size, t in rows]
  section = "\n".join([
      MARKS[0], "## Own images: the classify_files recipe vs an RBF SVC "
      "(`benchmarks/classify_digits.py`)", "",
      f"`mmjax finetune --config configs/classify_files.py:ROOT,tower=...` from scratch with "
      f"the recipe's defaults on {data}; the SVC is fitted on the same train split. "
      f"Wall time includes start-up, compilation and the evaluation. "
      f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, {os.cpu_count()} cores.", "",
      *table, MARKS[1]])
  md = ROOT / "BENCHMARKS.md"
  text = md.read_text()
  if MARKS[0] in text:
    text = re.sub(re.escape(MARKS[0]) + ".*?" + re.escape(MARKS[1]), lambda _: section, text,
                  flags=re.S)
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  md.write_text(text)
  print(f"wrote {md}")


if __name__ == "__main__":
  main()
