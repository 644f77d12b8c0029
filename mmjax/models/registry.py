"""Named sizes and `build_model(config)`.

A tower's `variant` is "<size>[/<patch>]" (e.g. "B/16", "mu/4"); any of
width/depth/heads/mlp_dim set to a non-zero value in the config overrides the size.
An image tower with `type="resnet"` is a ResNet instead (`resnet_size`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mmjax.models.dense import Peft
from mmjax.models.fusion import Fusion
from mmjax.models.model import CLASSIFIER_INPUTS, MultimodalModel
from mmjax.models import quantized
from mmjax.models.resnet import ResNet
from mmjax.models.text import TextEncoder
from mmjax.models.vit import ViT

# width, depth, mlp_dim, heads (ViT paper sizes; "mu" is a tiny test size).
SIZES: dict[str, dict[str, int]] = {
    "mu": dict(width=32, depth=1, mlp_dim=128, heads=2),
    "Ti": dict(width=192, depth=12, mlp_dim=768, heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, heads=16),
}
PATCHES = (32, 16, 14, 8, 4, 2)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Optional module fields a tower config may set (they default to the module's own
# defaults); the Hugging Face converter uses them to express CLIP, ViT, BERT, GPT-2.
IMAGE_OPTIONS = ("ln_eps", "patch_bias", "posemb_cls", "final_norm", "pooler", "num_classes")
TEXT_OPTIONS = ("ln_eps", "type_vocab", "embed_norm", "post_norm", "pooler", "head")
# ResNet variant -> (block, blocks per stage).
RESNETS: dict[str, tuple[str, tuple[int, ...]]] = {
    "18": ("basic", (2, 2, 2, 2)),
    "26": ("bottleneck", (2, 2, 2, 2)),
    "50": ("bottleneck", (3, 4, 6, 3)),
}


def _options(cfg, names) -> dict:
  return {k: cfg[k] for k in names if k in cfg}


def tower_size(cfg) -> dict[str, int]:
  """Resolve a tower config's variant and explicit overrides to sizes (+ patch)."""
  name, _, patch = cfg.get("variant", "").partition("/")
  if name and name not in SIZES:
    raise ValueError(f"unknown size {name!r} in variant {cfg.variant!r}; known: {sorted(SIZES)}")
  size = dict(SIZES.get(name, {}))
  for key in ("width", "depth", "mlp_dim", "heads"):
    if cfg.get(key, 0):
      size[key] = cfg[key]
  missing = [k for k in ("width", "depth", "mlp_dim", "heads") if k not in size]
  if missing:
    raise ValueError(f"tower config needs a variant or explicit {missing}")
  if patch:
    if int(patch) not in PATCHES:
      raise ValueError(f"patch {patch} in {cfg.variant!r}: expected one of {PATCHES}")
    size["patch"] = int(patch)
  elif cfg.get("patch", 0):
    size["patch"] = cfg.patch
  return size


def resnet_size(cfg) -> dict:
  """A ResNet tower config's `variant` ("50" or "resnet50") and stem `width` (default 64)
  resolved to ResNet fields; explicit `block`, `depths` and `widths` (stage output
  channels, what a Hugging Face import sets) override them. Stage widths double from
  the stem's (x4 at the output of bottleneck stages), as in He et al."""
  name = str(cfg.get("variant", "")).lower().removeprefix("resnet")
  if name and name not in RESNETS:
    raise ValueError(f"unknown ResNet variant {cfg.variant!r}; known: {sorted(RESNETS)}")
  block, depths = RESNETS.get(name, ("", ()))
  block, depths = cfg.get("block") or block, tuple(cfg.get("depths") or depths)
  if block not in ("basic", "bottleneck") or not depths:
    raise ValueError("a ResNet tower needs a variant ('18', '26', '50') or block "
                     "('basic' | 'bottleneck') and depths")
  width = cfg.get("width", 0) or 64
  expand = 4 if block == "bottleneck" else 1
  widths = tuple(cfg.get("widths") or (expand * width * 2 ** i for i in range(len(depths))))
  if len(widths) != len(depths):
    raise ValueError(f"model.image.widths {widths} and depths {depths} differ in length")
  return dict(depths=depths, widths=widths, bottleneck=block == "bottleneck", stem_width=width)


def _resnet(cfg, dtype) -> ResNet:
  size = resnet_size(cfg)
  norm, groups = cfg.get("norm", "batch"), cfg.get("groups", 32)
  if norm not in ("batch", "group"):
    raise ValueError(f"model.image.norm={norm!r}: expected 'batch' or 'group'")
  if cfg.get("pool", "gap") != "gap":
    raise ValueError(f"model.image.pool={cfg.pool!r}: a ResNet pools by global average ('gap')")
  channels = [size["stem_width"], *size["widths"]]
  if size["bottleneck"]:
    channels += [w // 4 for w in size["widths"]]
  if norm == "group" and any(c % groups for c in channels):
    raise ValueError(f"model.image.groups={groups} must divide every conv's channels "
                     f"{sorted(set(channels))}")
  return ResNet(**size, norm=norm, groups=groups, num_classes=cfg.get("num_classes", 0),
                dtype=dtype)


def peft_of(config: ml_collections.ConfigDict) -> Peft:
  """LoRA / adapter settings from `config.finetune` (none when it is absent)."""
  ft = config.get("finetune") or {}
  return Peft(lora_rank=ft.get("lora_rank", 0), lora_alpha=ft.get("lora_alpha", 16.0),
              lora_targets=tuple(ft.get("lora_targets", ("query", "value"))),
              adapter_dim=ft.get("adapter_dim", 0))


# model.decoder: what makes the text tower a decoder for generation, off by default.
# image_prefix: the image tokens are the decoder's first tokens (PaliGemma), not read
# through cross-attention.
DECODER_DEFAULTS = dict(cross_attention=False, prefix_lm=False, tie_embed=True,
                        image_prefix=False)


def decoder_options(m: ml_collections.ConfigDict) -> dict:
  """`model.decoder` with its defaults (configs from before it existed have none)."""
  return {**DECODER_DEFAULTS, **dict(m.get("decoder") or {})}


def image_token_count(image, image_size: int) -> int:
  """How many tokens the image tower outputs for a [image_size, image_size] image (traced
  abstractly: nothing is computed)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  out = jax.eval_shape(lambda x: image.init_with_output(jax.random.key(0), x)[0], x)
  return out["tokens"].shape[1]


def build_model(config: ml_collections.ConfigDict, vocab_size: int | None = None,
                special_ids: dict[str, int] | None = None) -> MultimodalModel:
  """The model described by `config.model` (+ which heads `config.objectives` read).

  `vocab_size` / `special_ids` come from the tokenizer when the config leaves
  `model.text.vocab_size` at 0.
  """
  m = config.model
  dtype = DTYPES[m.get("dtype", "float32")]
  common = dict(dropout=m.get("dropout", 0.0), drop_path=m.get("drop_path", 0.0), dtype=dtype,
                peft=peft_of(config), scan_layers=m.get("scan_layers", False),
                remat=m.get("remat", "none"))
  objectives = set(config.get("objectives", {}))

  image = None
  kind = m.image.get("type", "vit") if m.get("image") else None
  if kind == "resnet":
    image = _resnet(m.image, dtype)
    if m.get("tower_splits", 1) > 1 and image.norm == "batch":
      raise ValueError("model.tower_splits > 1 would give BatchNorm the statistics of each "
                       "slice of the batch; use tower_splits=1 or model.image.norm='group'")
  elif kind not in (None, "vit"):
    raise ValueError(f"model.image.type={kind!r}: expected 'vit' or 'resnet'")
  elif m.get("image"):
    size = tower_size(m.image)
    if "patch" not in size:
      raise ValueError("model.image needs a patch size: variant 'S/16' or model.image.patch")
    image = ViT(image_size=config.data.image_size, pool=m.image.get("pool", "cls"),
                act=m.image.get("act", "gelu"), pre_norm=m.image.get("pre_norm", False),
                **_options(m.image, IMAGE_OPTIONS), **size, **common)

  text, vocab = None, 0
  decoder = decoder_options(m)
  image_prefix = 0
  if decoder["image_prefix"]:
    if image is None:
      raise ValueError("model.decoder.image_prefix needs model.image")
    if decoder["cross_attention"]:
      raise ValueError("model.decoder.image_prefix puts the image tokens in the decoder's "
                       "input, instead of cross_attention: set cross_attention=False")
    if not (m.get("text") and m.text.get("causal", False)):
      raise ValueError("model.decoder.image_prefix needs a causal text tower "
                       "(model.text.causal)")
    image_prefix = image_token_count(image, config.data.image_size)
  if m.get("text"):
    vocab = m.text.get("vocab_size", 0) or vocab_size
    if not vocab:
      raise ValueError("model.text.vocab_size is 0 and no tokenizer vocabulary was given")
    # The position table may be longer than the batches' padded length (data.max_len).
    text = TextEncoder(vocab_size=vocab, max_len=m.text.get("max_len", 0) or config.data.max_len,
                       pool=m.text.get("pool", "cls"), causal=m.text.get("causal", False),
                       act=m.text.get("act", "gelu"), **_options(m.text, TEXT_OPTIONS),
                       cross=decoder["cross_attention"], tie_embed=decoder["tie_embed"],
                       image_prefix=image_prefix,
                       **tower_size(m.text), **common)
  generative = objectives & {"caption", "lm"}
  if generative and not (text is not None and text.causal and text.head == "lm"):
    raise ValueError(f"objectives {sorted(generative)} need a decoder: model.text with "
                     "causal=True and head='lm'")
  if (decoder["cross_attention"] or "caption" in objectives) and image is None:
    raise ValueError("model.decoder.cross_attention and the caption objective need "
                     "model.image")
  if decoder["prefix_lm"] and not (text is not None and text.causal):
    raise ValueError("model.decoder.prefix_lm needs a causal text tower (model.text.causal)")

  fusion = None
  if m.get("fusion"):
    fusion = Fusion(mode=m.fusion.get("mode", "merged"), act=m.fusion.get("act", "gelu"),
                    **tower_size(m.fusion), **common)
  needs_fusion = objectives & {"itm", "mlm"}
  if needs_fusion and fusion is None:
    raise ValueError(f"objectives {sorted(needs_fusion)} need model.fusion")
  classifier = m.get("classifier") or {}
  num_classes, classify_input = classifier.get("num_classes", 0), classifier.get("input", "image")
  if num_classes:
    if classify_input not in CLASSIFIER_INPUTS:
      raise ValueError(f"model.classifier.input={classify_input!r}: expected one of "
                       f"{sorted(CLASSIFIER_INPUTS)}")
    towers = {"image": image, "text": text, "fusion": fusion}
    absent = [t for t in CLASSIFIER_INPUTS[classify_input] if towers[t] is None]
    if absent:
      raise ValueError(f"model.classifier.input={classify_input!r} needs model.{absent[0]}")

  special = special_ids or {}
  model = MultimodalModel(
      image_tower=image, text_tower=text, fusion=fusion,
      embed_dim=m.get("embed_dim", 0), vocab_size=vocab,
      itm="itm" in objectives, mlm="mlm" in objectives, mlm_prob=m.get("mlm_prob", 0.15),
      mask_id=special.get("mask", 4),
      special_ids=tuple(special.get(k, d) for k, d in (("pad", 0), ("cls", 2), ("sep", 3))),
      logit_scale_init=m.get("logit_scale_init", 2.6593),
      logit_bias_init=m.get("logit_bias_init", 0.0), num_classes=num_classes,
      classify_input=classify_input, tower_splits=m.get("tower_splits", 1),
      caption="caption" in objectives, lm="lm" in objectives,
      prefix_lm=decoder["prefix_lm"], dtype=dtype)
  # A quantized workdir (mmjax quantize) records its mode: the model is rebuilt quantized.
  return quantized.from_config(model, m.get("quantize"))
