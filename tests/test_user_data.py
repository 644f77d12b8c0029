"""Training end to end on users' own data: image-text files and a TFDS dataset."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

import mmjax

from test_data import _tiny_tfds

TINY = ["--config.total_steps=4", "--config.batch_size=8", "--config.eval_batch_size=8",
        "--config.log_every=2", "--config.checkpoint_every=0", "--config.data.image_size=16",
        "--config.data.vocab_size=64", "--config.model.embed_dim=16"]
for tower in ("image", "text", "fusion"):
  TINY += [f"--config.model.{tower}.variant=mu", f"--config.model.{tower}.width=0",
           f"--config.model.{tower}.depth=1", f"--config.model.{tower}.heads=0",
           f"--config.model.{tower}.mlp_dim=0"]


def _pairs(folder, n=20, bad=()):
  rows = []
  for i in range(n):
    Image.fromarray(np.full((20, 24, 3), 10 * i, np.uint8)).save(folder / f"{i}.png")
    rows.append({"image": f"{i}.png", "caption": f"a grey picture number {i % 5}"})
  rows += list(bad)
  (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return folder / "pairs.jsonl"


def test_train_on_jsonl_skips_and_counts_bad_rows(tmp_path, caplog):
  (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
  path = _pairs(tmp_path, bad=[{"image": "missing.png", "caption": "gone"},
                              {"image": "broken.png", "caption": "corrupt"},
                              {"image": "3.png", "caption": "  "},
                              {"caption": "no image field"}])
  config = mmjax.load_config(f"configs/pretrain_files.py:{path}", TINY)
  with caplog.at_level(logging.WARNING):
    result = mmjax.train(config, tmp_path / "run", progress=False)
  assert result["steps"] == 4
  assert 0.0 <= result["retrieval_i2t_r1"] <= 1.0 and "itm_acc" in result
  assert "skipped 4 of 24 rows" in caplog.text
  for name in ("missing.png", "broken.png"):
    assert name in caplog.text


def test_train_on_jsonl_with_on_bad_error_names_the_row(tmp_path):
  path = _pairs(tmp_path, bad=[{"image": "missing.png", "caption": "gone"}])
  config = mmjax.load_config(f"configs/pretrain_files.py:{path}",
                             TINY + ["--config.data.on_bad=error"])
  with pytest.raises(mmjax.data.DataError, match=rf"{path}:21: image not found"):
    mmjax.train(config, tmp_path / "run", progress=False)
  assert not (tmp_path / "run" / "checkpoints").exists() or not any(
      (tmp_path / "run" / "checkpoints").iterdir())


def test_train_on_tfds_array_record_with_zeroshot_over_label_names(tmp_path):
  _tiny_tfds(tmp_path / "tfds")
  config = mmjax.load_config("configs/pretrain_tfds.py:tiny_pairs",
                             TINY + [f"--config.data.data_dir={tmp_path / 'tfds'}",
                                     "--config.data.image_size=12"])
  result = mmjax.train(config, tmp_path / "run", progress=False)
  assert result["steps"] == 4
  assert 0.0 <= result["zeroshot_acc"] <= 1.0
  assert result["retrieval_num_pairs"] == 5
