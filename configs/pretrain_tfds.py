"""CLIP + ITM pretraining on a TFDS dataset read offline from a local data_dir.

  mmjax train --config configs/pretrain_tfds.py:my_dataset --workdir runs/x \
      --config.data.data_dir=/data/tfds --config.data.text_key=caption

The dataset must be prepared in array_record format (it is then read without
TensorFlow, through tfds.data_source + grain). A dataset with labels but no
captions (data.text_key="") gets captions from data.caption_template, and the
zero-shot evaluator classifies its label names.
"""
import ml_collections


def get_config(name=""):
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
      name="tfds", tfds_name=name, data_dir="", image_key="image", text_key="",
      label_key="label", caption_template="a photo of a {}.", image_size=32, max_len=16,
      seed=0, num_workers=0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
      augment=dict(crop_scale=(0.8, 1.0), flip=True),
      tokenizer="", vocab_size=1024, cache_dir=""))
  tower = lambda **kw: ml_collections.ConfigDict(dict(
      variant="", width=128, depth=4, heads=4, mlp_dim=256, **kw))
  c.model = ml_collections.ConfigDict(dict(
      image=tower(patch=4, pool="cls"), text=tower(pool="cls", vocab_size=0),
      fusion=tower(mode="cross"), embed_dim=128, dtype="float32",
      dropout=0.0, drop_path=0.0, mlm_prob=0.15))
  c.model.fusion.depth = 1
  c.objectives = ml_collections.ConfigDict(dict(contrastive=1.0, itm=0.5))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05,
      schedule="cosine", warmup_steps=100, end_lr_factor=0.0, clip_norm=1.0,
      accum_steps=1, frozen=""))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.sharding_rules = ()
  c.evals = ml_collections.ConfigDict(dict(
      zeroshot=dict(type="zeroshot", split="test", label="label", ensemble="mean",
                    templates=("a photo of a {}.", "a {}.")),
      retrieval=dict(type="retrieval", split="test")))
  return c
