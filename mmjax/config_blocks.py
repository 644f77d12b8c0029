"""Pieces that several configs/*.py share, so each is written once.

They live in the package rather than in configs/: `load_config` runs a config file by
its path, so `import configs.common` would only resolve from the repository root,
while `from mmjax.config_blocks import shapes_data` works for a config anywhere.
"""
from __future__ import annotations

import ml_collections

from mmjax.config import data_block, tower

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
