"""CLIP + ITM pretraining on your own image-text pairs.

  mmjax train --config configs/pretrain_files.py:/data/pairs.jsonl --workdir runs/mine

The file is JSONL ({"image": "relative/or/absolute.jpg", "caption": "..."} per
line) or CSV with a header; `{split}` in the path is replaced by the split name
("train", "test"), otherwise one file serves both. Image paths are relative to
the file's folder unless data.image_dir is set. Rows with a missing or corrupt
image or an empty caption are skipped and counted (data.on_bad="error" makes
them fatal). Without data.tokenizer (a local Hugging Face tokenizer folder) a
WordPiece tokenizer is trained on the captions and cached.
"""
import ml_collections

from mmjax.config import base_config, data_block, tower


def get_config(path=""):
  c = base_config()
  c.total_steps = 2000
  c.eval_batch_size = 128
  # Every other field (data.tokenizer, data.train_examples, ...): mmjax/config.py DATA_FIELDS.
  c.data = data_block(
      "files", path=path, image_dir="", image_key="image", text_key="caption", label_key="",
      on_bad="skip", image_size=64, max_len=32,
      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),     # ImageNet's
      augment=dict(crop_scale=(0.6, 1.0), flip=True), vocab_size=4096)
  c.model = ml_collections.ConfigDict(dict(
      image=tower(variant="Ti", patch=8, depth=6),
      text=tower(variant="Ti", depth=6, vocab_size=0),
      fusion=tower(variant="Ti", depth=2, mode="cross"), embed_dim=256, dtype="float32",
      dropout=0.0, drop_path=0.1, mlm_prob=0.15))
  c.objectives = ml_collections.ConfigDict(dict(contrastive=1.0, itm=0.5))
  c.optim.update(dict(lr=5e-4, eps=1e-6, weight_decay=0.1, warmup_steps=200))
  c.evals = ml_collections.ConfigDict(dict(
      retrieval=dict(type="retrieval", split="test"),
      itm=dict(type="itm", split="test")))
  return c
