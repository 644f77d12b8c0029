"""An image classifier on your own labelled images, from scratch or from a pretrained model.

  mmjax finetune --data /path/to/images --workdir runs/mine [--init CKPT_OR_HF_DIR]
  mmjax finetune --config configs/classify_files.py:/path/to/images --workdir runs/mine

The path is either
  a folder laid out root/<class name>/*.jpg|png|... (ImageFolder); root/train and
    root/test (or root/val) are the splits when present, else a stratified
    `data.test_fraction` (20%) of each class is held out, by `data.seed`;
  or a .jsonl / .csv file of rows with an image path (`data.image_key`, "image") and a
    label (`data.label_key`, "label"): strings ("cat") or integers. `{split}` in the
    path names one file per split ("train", "test"); without it 20% is held out.
Class names (the sorted folder names, or the sorted label strings of the train split)
are written to <workdir>/label_names.json and name the rows of the classification
report and confusion matrix in <workdir>/reports.

The recipe, by the number of labelled images n (counted here, before anything runs):
a ViT (or with `tower=resnet` a ResNet) sized to n, AdamW with a cosine schedule and a
1-epoch warmup, random-resized crops, label smoothing 0.1, and enough epochs that a
small set still gets ~1,500 steps (max(30, 1500 * batch / n) epochs, at most 100;
15 above 50,000 images). No flip by default: scans, digits and text have a handedness;
photos gain from `--config.data.augment.flip=True`.

With --init (an mmjax workdir, or a Hugging Face ViT / CLIP / ResNet directory) the image
tower, image size and normalisation are the checkpoint's (`init.towers`); any strategy
of the fine-tuning suite applies (`--config.finetune.strategy=linear_probe`, ...).

arg: PATH[,token,...]
  tower=vit|resnet   the image tower (default vit)
  size=auto|small|medium|large   the tower's size (auto: by n)
  image_size=N       pixels per side (default: the images' typical shorter side rounded
                     up to a multiple of 16, from 32 to 64)
  tiny               a seconds-long run for tests
"""
import math
import os
import pathlib

import ml_collections
import numpy as np
from PIL import Image

from mmjax.config import ConfigError, base_config, data_block, parse_arg, tower
from mmjax.config_blocks import ROW_SUFFIXES, TINY_TOWER, path_arg, resnet_tower, train_rows
from mmjax.tuning.config import finetune_config, init_config

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# n images -> the recipe's size; the first whose bound n is under.
SIZES = (("small", 10_000), ("medium", 50_000), ("large", math.inf))
VIT = {"small": dict(width=96, depth=4, heads=4, mlp_dim=192),
       "medium": dict(width=192, depth=6, heads=3, mlp_dim=768),
       "large": dict(width=384, depth=12, heads=6, mlp_dim=1536)}
RESNET = {"small": dict(variant="18", width=32), "medium": dict(variant="18", width=64),
          "large": dict(variant="50", width=64)}
# HF tensors of a CLIP or an image-classification checkpoint that an image classifier
# leaves unused: the text side, the projections and the old head.
UNUSED_HF = r"^(text_model\.|text_projection|visual_projection|logit_scale|classifier\.)"


def count_images(path: pathlib.Path, test_fraction: float) -> tuple[str, int | None]:
  """(data source name, number of train images) of `path`, without reading an image:
  rows of a .jsonl/.csv file, files by suffix in a folder (in its train/ part when it
  has train/ and test/ or val/). None when the path is not there (yet): the source
  names it when the run starts."""
  if path.suffix.lower() in ROW_SUFFIXES:
    return "files", train_rows(path, test_fraction)
  if not path.is_dir():
    return "folder", None
  split = (path / "train").is_dir() and ((path / "test").is_dir() or (path / "val").is_dir())
  root = path / "train" if split else path
  n = sum(1 for _, _, files in os.walk(root) for f in files
          if pathlib.Path(f).suffix.lower() in IMAGE_SUFFIXES)
  return "folder", (n if split else int(n * (1 - test_fraction)))


def typical_side(path: pathlib.Path, sample: int = 16) -> int:
  """The median shorter side of up to `sample` images of a folder (PIL reads the header
  only); 0 for a file of rows or a folder without readable images."""
  if not path.is_dir():
    return 0
  sides = []
  for folder, _, files in sorted(os.walk(path)):
    for f in sorted(files)[:2]:
      if pathlib.Path(f).suffix.lower() in IMAGE_SUFFIXES and len(sides) < sample:
        try:
          with Image.open(pathlib.Path(folder) / f) as image:
            sides.append(min(image.size))
        except OSError:
          pass       # the source counts and reports it
  return int(np.median(sides)) if sides else 0


def recipe_image_size(side: int) -> int:
  """Small images are upsampled to 32 (a 4x4 patch grid of 8); larger ones kept up to
  64 in steps of 16: on a CPU the step time grows with the square of the size."""
  return 64 if not side else int(min(64, max(32, 16 * math.ceil(side / 16))))


def recipe_epochs(n: int | None, batch_size: int) -> float:
  if n is None:
    return 30.0
  if n > 50_000:
    return 15.0
  return float(min(100, max(30, math.ceil(1500 * batch_size / max(n, 1)))))


def get_config(arg=None):
  path, rest = path_arg(arg, {"tiny"}, where="configs/classify_files.py")
  tokens, opts = parse_arg(rest, {"tiny"}, dict(tower="vit", size="auto", image_size=0),
                           where="configs/classify_files.py")
  if opts["tower"] not in ("vit", "resnet"):
    raise ConfigError(f"configs/classify_files.py: tower={opts['tower']!r}: expected vit or "
                      f"resnet")
  test_fraction = 0.0 if "{split}" in str(path) else 0.2
  source, n = count_images(path, test_fraction)
  size = opts["size"]
  if size == "auto":
    size = next(name for name, bound in SIZES if (n or 0) < bound)
  elif size not in VIT:
    raise ConfigError(f"configs/classify_files.py: size={size!r}: expected auto, "
                      f"{', '.join(VIT)}")

  c = base_config()
  c.batch_size = 64
  c.eval_batch_size = 256
  c.epochs = recipe_epochs(n, c.batch_size)
  c.optim.warmup_epochs = 1.0
  c.checkpoint_every_epochs = 5.0
  c.keep_checkpoints = 1
  c.log_every = 20
  s = opts["image_size"] or recipe_image_size(typical_side(path))
  c.data = data_block(
      source, path=str(path), label_key="label", image_size=s, max_len=8, vocab_size=512,
      augment=dict(crop_scale=(0.7, 1.0), flip=False), test_fraction=test_fraction)
  if source == "files":
    c.data.text_key = ""     # no caption column: the class name is the text
  image = (resnet_tower(**RESNET[size]) if opts["tower"] == "resnet"
           else tower(patch=max(s // 8, 1), pool="gap", **VIT[size]))
  c.model = ml_collections.ConfigDict(dict(
      image=image, classifier=dict(input="image", num_classes=0), dtype="float32",
      dropout=0.0, drop_path=0.1))
  c.objectives = ml_collections.ConfigDict(dict(classify=1.0))
  c.objective_options = ml_collections.ConfigDict(dict(
      classify=dict(label="label", label_smoothing=0.1)))
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.finetune = finetune_config(strategy="full")
  c.init = init_config(towers=("image",), ignore=UNUSED_HF, lr=1e-4)
  c.evals = ml_collections.ConfigDict(dict(
      report=dict(type="classification", split="test", label="label")))

  if "tiny" in tokens:
    c.epochs = 2.0
    c.batch_size = 8
    c.eval_batch_size = 32
    c.log_every = 2
    c.optim.warmup_epochs = 0.0
    c.optim.warmup_steps = 1
    c.checkpoint_every_epochs = 0.0
    c.checkpoint_every = 0
    if opts["tower"] == "vit":
      c.model.image.update(TINY_TOWER)
    else:
      c.model.image.update(variant="18", width=8, groups=4)
  return c
