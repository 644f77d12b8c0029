"""Pieces that several configs/*.py share, so each is written once.

They live in the package rather than in configs/: `load_config` runs a config file by
its path, so `import configs.common` would only resolve from the repository root,
while `from mmjax.config_blocks import shapes_data` works for a config anywhere.
"""
from __future__ import annotations

import pathlib

import ml_collections

from mmjax.config import ConfigError, data_block, tower

# The "tiny" arg's towers: a seconds-long run for tests and the notebooks.
TINY_TOWER = dict(width=32, depth=1, heads=2, mlp_dim=64)
# configs/demo.py's towers' size; the fine-tune configs on `shapes` share it, so a demo
# workdir initialises them.
DEMO_SIZE = dict(width=96, depth=3, heads=4, mlp_dim=192)


def demo_towers() -> dict[str, ml_collections.ConfigDict]:
  """configs/demo.py's image, text and fusion towers."""
  return dict(image=tower(patch=4, **DEMO_SIZE),
              text=tower(vocab_size=0, **dict(DEMO_SIZE, depth=2)),
              fusion=tower(mode="cross", **dict(DEMO_SIZE, depth=1)))


def shapes_data(**fields) -> ml_collections.ConfigDict:
  """configs/demo.py's data: built-in `shapes` at 32x32, 16-token captions and a
  256-word tokenizer trained on them. No flip (captions say "left of") and no crop
  (it could cut off a shape)."""
  return data_block("shapes", **{**dict(image_size=32, max_len=16, eval_size=1024,
                                        vocab_size=256), **fields})


def digits_data(**fields) -> ml_collections.ConfigDict:
  """scikit-learn's digits at 32x32 with light crops. No flip: digits have a handedness."""
  return data_block("digits", **{**dict(image_size=32, max_len=16, vocab_size=256,
                                        augment=dict(crop_scale=(0.8, 1.0), flip=False)),
                                 **fields})


def path_arg(arg: str | None, flags=(), *, where: str) -> tuple[pathlib.Path, str]:
  """`PATH[,token,...]` of a config for the user's own data -> (PATH, the tokens), for
  `parse_arg`; a ConfigError when no path is given."""
  first, _, rest = (arg or "").partition(",")
  if "=" in first or first in flags:
    first, rest = "", arg or ""
  if not first:
    raise ConfigError(f"{where} needs a path: --config {where}:/path/to/data")
  return pathlib.Path(first).expanduser(), rest


ROW_SUFFIXES = (".jsonl", ".json", ".csv")


def train_rows(path: pathlib.Path, test_fraction: float) -> int | None:
  """Rows of the train split of a .jsonl/.csv `path` (`{split}` in it: the train file's;
  else the rows less `test_fraction`), counted by line without parsing: what a recipe
  sizes its model and epochs by. None when the file is not there (yet): the data source
  names it when the run starts."""
  file = pathlib.Path(str(path).replace("{split}", "train"))
  if not file.is_file():
    return None
  with open(file, "rb") as f:
    rows = sum(1 for line in f if line.strip()) - (file.suffix.lower() == ".csv")
  return rows if "{split}" in str(path) else int(rows * (1 - test_fraction))


def resnet_tower(**fields) -> ml_collections.ConfigDict:
  """A ResNet image tower's config (mmjax/models/resnet.py): `variant` "18" | "26" | "50",
  stem `width`, `norm` "batch" | "group" (`groups` per GroupNorm); explicit `block`,
  `depths`, `widths` (a Hugging Face import's) override the variant."""
  base = dict(type="resnet", variant="50", width=64, norm="batch", groups=32, pool="gap",
              block="", depths=(), widths=())
  return ml_collections.ConfigDict({**base, **fields})
