"""CLIP + ITM pretraining on a TFDS dataset read offline from a local data_dir.

  mmjax train --config configs/pretrain_tfds.py:my_dataset --workdir runs/x \
      --config.data.data_dir=/data/tfds --config.data.text_key=caption

The dataset must be prepared in array_record format (it is then read without
TensorFlow, through tfds.data_source + grain). A dataset with labels but no
captions (data.text_key="") gets captions from data.caption_template, and the
zero-shot evaluator classifies its label names.
"""
import ml_collections

from mmjax.config import base_config, data_block, tower


def get_config(name=""):
  c = base_config()
  c.total_steps = 2000
  c.eval_batch_size = 128
  # Every other field (data.tokenizer, data.train_examples, ...): mmjax/config.py DATA_FIELDS.
  c.data = data_block(
      "tfds", tfds_name=name, data_dir="", image_key="image", text_key="", label_key="label",
      caption_template="a photo of a {}.", image_size=32, max_len=16,
      augment=dict(crop_scale=(0.8, 1.0), flip=True), vocab_size=1024)
  size = dict(width=128, depth=4, heads=4, mlp_dim=256)
  c.model = ml_collections.ConfigDict(dict(
      image=tower(patch=4, **size), text=tower(vocab_size=0, **size),
      fusion=tower(mode="cross", **dict(size, depth=1)), embed_dim=128, dtype="float32",
      dropout=0.0, drop_path=0.0, mlm_prob=0.15))
  c.objectives = ml_collections.ConfigDict(dict(contrastive=1.0, itm=0.5))
  c.evals = ml_collections.ConfigDict(dict(
      zeroshot=dict(type="zeroshot", split="test", label="label", ensemble="mean",
                    templates=("a photo of a {}.", "a {}.")),
      retrieval=dict(type="retrieval", split="test")))
  return c
