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


def get_config(path=""):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 2000
  c.stop_after = 0
  c.batch_size = 64
  c.eval_batch_size = 128
  c.log_every = 50
  c.eval_every = 0
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.data = ml_collections.ConfigDict(dict(
      name="files", path=path, image_dir="", image_key="image", text_key="caption",
      label_key="", on_bad="skip", image_size=64, max_len=32, seed=0, num_workers=0,
      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
      augment=dict(crop_scale=(0.6, 1.0), flip=True),
      tokenizer="", vocab_size=4096, cache_dir=""))
  tower = lambda **kw: ml_collections.ConfigDict(dict(
      variant="Ti", width=0, depth=6, heads=0, mlp_dim=0, **kw))
  c.model = ml_collections.ConfigDict(dict(
      image=tower(patch=8, pool="cls"), text=tower(pool="cls", vocab_size=0),
      fusion=tower(mode="cross"), embed_dim=256, dtype="float32",
      dropout=0.0, drop_path=0.1, mlm_prob=0.15))
  c.model.fusion.depth = 2
  c.objectives = ml_collections.ConfigDict(dict(contrastive=1.0, itm=0.5))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
      schedule="cosine", warmup_steps=200, end_lr_factor=0.0, clip_norm=1.0,
      accum_steps=1, frozen=""))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.sharding_rules = ()
  c.evals = ml_collections.ConfigDict(dict(
      retrieval=dict(type="retrieval", split="test"),
      itm=dict(type="itm", split="test")))
  return c
