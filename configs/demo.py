"""The default demo: a small CLIP + ITM model on the built-in `shapes` data.

Trains in a few minutes on a 2-core CPU; the same file runs on a GPU or a TPU
pod (raise batch_size and sizes with --config.x=y).

  arg "tiny": a seconds-long variant for tests and the notebook.
"""
import ml_collections

from mmjax.config import base_config, tower
from mmjax.data.shapes import COLORS, SHAPES, SIZES


def zeroshot_templates(attribute: str) -> tuple[str, ...]:
  """Prompts with the other attributes spelled out: "a small {} circle" for colour."""
  if attribute == "color":
    return tuple(f"a {size} {{}} {shape}" for size in SIZES for shape in SHAPES)
  if attribute == "shape":
    return tuple(f"a {size} {color} {{}}" for size in SIZES for color in COLORS)
  raise ValueError(attribute)


def get_config(arg=None):
  c = base_config()
  c.total_steps = 1500
  c.log_every = 25

  c.data = ml_collections.ConfigDict(dict(
      name="shapes", image_size=32, max_len=16, seed=0, num_workers=0,
      train_size=50_000, eval_size=1024, num_objects=(1, 3),
      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
      augment=dict(crop_scale=(1.0, 1.0), flip=False),   # no flip: captions say "left of"
      tokenizer="", vocab_size=256, cache_dir=""))

  size = dict(width=96, depth=3, heads=4, mlp_dim=192)
  c.model = ml_collections.ConfigDict(dict(
      image=tower(patch=4, **size), text=tower(vocab_size=0, **dict(size, depth=2)),
      fusion=tower(mode="cross", **dict(size, depth=1)), embed_dim=96, dtype="float32",
      dropout=0.0, drop_path=0.0, mlm_prob=0.15))

  # MLM (e.g. mlm=0.25) adds ~25% to the step time; the demo's metrics do not need it.
  c.objectives = ml_collections.ConfigDict(dict(contrastive=1.0, itm=0.5))

  # Zero-shot on single-object test images; the prompts name the other
  # attributes, so a class scores as its best prompt (ensemble="max").
  single = dict(num_objects=(1, 1))
  zeroshot = lambda label: dict(type="zeroshot", split="test", label=label, data=single,
                                ensemble="max", templates=zeroshot_templates(label))
  c.evals = ml_collections.ConfigDict(dict(
      zeroshot_color=zeroshot("color"),
      zeroshot_shape=zeroshot("shape"),
      retrieval=dict(type="retrieval", split="test"),
      itm=dict(type="itm", split="test"),
  ))

  if arg == "tiny":
    c.total_steps = 30
    c.batch_size = 16
    c.eval_batch_size = 64
    c.log_every = 10
    c.checkpoint_every = 10
    c.data.train_size = 512
    c.data.eval_size = 64
    for t in (c.model.image, c.model.text, c.model.fusion):
      t.width, t.depth, t.heads, t.mlp_dim = 32, 1, 2, 64
    c.model.embed_dim = 32
  elif arg:
    raise ValueError(f"configs/demo.py: unknown arg {arg!r} (known: 'tiny')")
  return c
