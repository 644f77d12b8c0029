"""Hugging Face `config.json` <-> the `model` and `data` sections of an mmjax config.

Every size, activation, epsilon and table length is read from the HF config
(missing fields take transformers' own defaults), never assumed. The reverse
direction recognises which HF architecture an mmjax model config expresses and
says which option does not fit when none does.
"""
from __future__ import annotations

import ml_collections

from mmjax.models.registry import resnet_size

SUPPORTED = ("CLIPModel", "ViTModel", "ViTForImageClassification", "BertModel",
             "BertForMaskedLM", "GPT2LMHeadModel", "ResNetModel", "ResNetForImageClassification")
_BY_MODEL_TYPE = {"clip": "CLIPModel", "vit": "ViTModel", "bert": "BertModel",
                  "gpt2": "GPT2LMHeadModel", "resnet": "ResNetModel"}

ACT_FROM_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
ACT_TO_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh",
             "relu": "relu"}

# transformers' defaults for fields a config.json may leave out.
_CLIP_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5)
_CLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, image_size=224, patch_size=32, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5)
_VIT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, qkv_bias=True,
            num_channels=3)
_BERT = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
             type_vocab_size=2, layer_norm_eps=1e-12, position_embedding_type="absolute")
_GPT2 = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
             activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
             scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
_RESNET = dict(num_channels=3, embedding_size=64, hidden_sizes=(256, 512, 1024, 2048),
               depths=(3, 4, 6, 3), layer_type="bottleneck", hidden_act="relu",
               downsample_in_first_stage=False, downsample_in_bottleneck=False)
RESNET_IMAGE_SIZE = 224   # HF ResNet configs state none; its image processors crop to 224


class UnsupportedModel(ValueError):
  pass


def architecture(hf: dict) -> str:
  """The HF architecture name of a config.json, one of SUPPORTED."""
  archs = hf.get("architectures") or [_BY_MODEL_TYPE.get(hf.get("model_type"), "")]
  if archs[0] not in SUPPORTED:
    raise UnsupportedModel(f"architecture {archs[0] or hf.get('model_type')!r} is not supported; "
                           f"mmjax converts {', '.join(SUPPORTED)}")
  return archs[0]


def _act(name: str, where: str) -> str:
  if name not in ACT_FROM_HF:
    raise UnsupportedModel(f"{where}={name!r}: mmjax has {sorted(ACT_FROM_HF)}")
  return ACT_FROM_HF[name]


def _tower(c: dict, width: str, depth: str, heads: str, mlp: str, act: str, eps: str,
           where: str, **extra) -> dict:
  return dict(variant="", width=c[width], depth=c[depth], heads=c[heads],
              mlp_dim=c[mlp] or 4 * c[width], act=_act(c[act], f"{where}.{act}"),
              ln_eps=float(c[eps]), **extra)


_BERT_NAMES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "hidden_act", "layer_norm_eps")


def to_mmjax(hf: dict, *, pooler: bool = False, text_pool: str | None = None,
             text_max_len: int = 0, image_size: int = 0) -> ml_collections.ConfigDict:
  """{"data": {...}, "model": {...}} for the HF config `hf`.

  `pooler`: the checkpoint holds a pooler (ViTModel / BertModel may or may not).
  `text_pool`: override of the text pooling (sentence-transformers' mean pooling).
  `text_max_len`: padded length of text batches (default: the position table's length).
  `image_size`: load at another resolution (position embeddings are resampled).
  """
  arch = architecture(hf)
  data, model = {}, {}
  if arch == "CLIPModel":
    t = {**_CLIP_TEXT, **hf.get("text_config", {})}
    v = {**_CLIP_VISION, **hf.get("vision_config", {})}
    vision_names = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "hidden_act", "layer_norm_eps")
    model["image"] = _tower(v, *vision_names, "vision_config", patch=v["patch_size"], pool="cls",
                            pre_norm=True, patch_bias=False, posemb_cls=True,
                            final_norm="pooled")
    model["text"] = _tower(t, *vision_names, "text_config", vocab_size=t["vocab_size"],
                           max_len=t["max_position_embeddings"], pool="eos", causal=True)
    model["embed_dim"] = hf.get("projection_dim", 512)
    model["logit_scale_init"] = float(hf.get("logit_scale_init_value", 2.6592))
    data.update(image_size=v["image_size"], max_len=t["max_position_embeddings"])
  elif arch.startswith("ViT"):
    v = {**_VIT, **hf}
    if not v["qkv_bias"] or v["num_channels"] != 3:
      raise UnsupportedModel("ViT with qkv_bias=False or num_channels != 3 is not supported")
    head = 0
    if arch == "ViTForImageClassification":
      head = _num_labels(v)
    model["image"] = _tower(v, *_BERT_NAMES, "config", patch=v["patch_size"], pool="cls",
                            posemb_cls=True, pooler=pooler, num_classes=head)
    data["image_size"] = v["image_size"]
  elif arch.startswith("ResNet"):
    r = {**_RESNET, **hf}
    if (r["num_channels"] != 3 or r["hidden_act"] != "relu" or r["downsample_in_first_stage"]
        or r["downsample_in_bottleneck"]):
      raise UnsupportedModel("ResNet with num_channels != 3, hidden_act != 'relu', "
                             "downsample_in_first_stage or downsample_in_bottleneck (v1) is "
                             "not supported")
    head = _num_labels(r) if arch == "ResNetForImageClassification" else 0
    model["image"] = dict(type="resnet", variant="", norm="batch", width=r["embedding_size"],
                          groups=32, pool="gap", block=r["layer_type"],
                          depths=tuple(r["depths"]), widths=tuple(r["hidden_sizes"]),
                          num_classes=head)
    data["image_size"] = RESNET_IMAGE_SIZE
  elif arch.startswith("Bert"):
    b = {**_BERT, **hf}
    if b["position_embedding_type"] != "absolute" or b.get("is_decoder"):
      raise UnsupportedModel("only absolute-position BERT encoders are supported")
    model["text"] = _tower(b, *_BERT_NAMES, "config", vocab_size=b["vocab_size"],
                           max_len=b["max_position_embeddings"], pool=text_pool or "cls",
                           type_vocab=b["type_vocab_size"], embed_norm=True, post_norm=True,
                           pooler=pooler, head="mlm" if arch == "BertForMaskedLM" else "")
    data["max_len"] = b["max_position_embeddings"]
  else:  # GPT-2
    g = {**_GPT2, **hf}
    if (not g["scale_attn_weights"] or g["scale_attn_by_inverse_layer_idx"]
        or g["add_cross_attention"]):
      raise UnsupportedModel("GPT-2 with scale_attn_weights=False, scale_attn_by_inverse_"
                             "layer_idx or cross-attention is not supported")
    if not g.get("tie_word_embeddings", True):
      raise UnsupportedModel("GPT-2 with an untied lm_head is not supported")
    model["text"] = _tower(g, "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                           "layer_norm_epsilon", "config", vocab_size=g["vocab_size"],
                           max_len=g["n_positions"], pool="eos", causal=True, head="lm")
    data["max_len"] = g["n_positions"]
  if "image" in model:
    stored = data["image_size"]
    data["image_size"] = image_size or stored
    if "patch" in model["image"] and data["image_size"] % model["image"]["patch"]:
      raise UnsupportedModel(f"image_size={data['image_size']} is not a multiple of the "
                             f"patch size {model['image']['patch']}")
  if "text" in model and text_max_len:
    data["max_len"] = min(text_max_len, model["text"]["max_len"])
  return ml_collections.ConfigDict({"data": data, "model": model})


def _num_labels(hf: dict) -> int:
  return len(hf.get("id2label") or {}) or hf.get("num_labels", 2)


def _labels(hf: dict, n: int) -> dict:
  """id2label / label2id for `n` classes: the base config's when it has `n`."""
  labels = hf.get("id2label") or {}
  if len(labels) != n:
    labels = {str(i): f"LABEL_{i}" for i in range(n)}
  return dict(id2label=labels, label2id={v: int(k) for k, v in labels.items()})


def _need(tower, where: str, **want) -> None:
  wrong = [f"{where}.{k}={tower.get(k)!r} (needs {v!r})" for k, v in want.items()
           if tower.get(k, _MODULE_DEFAULTS.get(k)) != v]
  if wrong:
    raise UnsupportedModel("this mmjax model has no Hugging Face equivalent: " + ", ".join(wrong))


_MODULE_DEFAULTS = dict(pool="cls", act="gelu", pre_norm=False, causal=False, patch_bias=True,
                        posemb_cls=False, final_norm="tokens", pooler=False, num_classes=0,
                        type_vocab=0, embed_norm=False, post_norm=False, head="")


def hf_architecture(model: ml_collections.ConfigDict) -> str:
  """Which HF architecture an mmjax `config.model` expresses (or UnsupportedModel)."""
  image, text = model.get("image"), model.get("text")
  if model.get("fusion"):
    raise UnsupportedModel("models with a fusion Transformer have no Hugging Face equivalent")
  if image and image.get("type", "vit") == "resnet":
    if text:
      raise UnsupportedModel("a ResNet image tower with a text tower has no Hugging Face "
                             "equivalent (CLIPModel's image tower is a ViT)")
    if image.get("norm", "batch") != "batch":
      raise UnsupportedModel(f"model.image.norm={image.norm!r}: Hugging Face's ResNet has "
                             f"BatchNorm ('batch')")
    return "ResNetForImageClassification" if image.get("num_classes") else "ResNetModel"
  if image and text:
    _need(image, "model.image", pool="cls", pre_norm=True, patch_bias=False, posemb_cls=True,
          final_norm="pooled", pooler=False, num_classes=0)
    _need(text, "model.text", pool="eos", causal=True, post_norm=False, type_vocab=0,
          embed_norm=False, pooler=False, head="")
    if not model.get("embed_dim"):
      raise UnsupportedModel("a two-tower model needs model.embed_dim (CLIP's projections)")
    return "CLIPModel"
  if image:
    _need(image, "model.image", pool="cls", pre_norm=False, patch_bias=True, posemb_cls=True,
          final_norm="tokens")
    if image.get("num_classes") and image.get("pooler"):
      raise UnsupportedModel("ViTForImageClassification has no pooler under its head")
    return "ViTForImageClassification" if image.get("num_classes") else "ViTModel"
  if text and text.get("causal"):
    _need(text, "model.text", pool="eos", post_norm=False, type_vocab=0, embed_norm=False,
          pooler=False, head="lm")
    return "GPT2LMHeadModel"
  if text:
    _need(text, "model.text", causal=False, post_norm=True, embed_norm=True)
    if not text.get("type_vocab"):
      raise UnsupportedModel("a BERT export needs model.text.type_vocab > 0")
    return "BertForMaskedLM" if text.get("head") == "mlm" else "BertModel"
  raise UnsupportedModel("the model has neither an image nor a text tower")


def to_hf(config: ml_collections.ConfigDict, base: dict | None = None) -> dict:
  """The HF config.json of an mmjax config, over `base` (the original HF config, when the
  model came from one: token ids, label names and other fields mmjax does not model)."""
  m = config.model
  arch = hf_architecture(m)
  hf = {k: v for k, v in (base or {}).items() if k not in ("architectures", "_name_or_path")}
  hf["architectures"] = [arch]

  def sizes(t, *names):
    return dict(zip(names, (t.width, t.depth, t.heads, t.mlp_dim, ACT_TO_HF[t.get("act", "gelu")],
                            t.get("ln_eps", 1e-6))))

  if arch == "CLIPModel":
    names = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "hidden_act", "layer_norm_eps")
    text = dict(hf.get("text_config", {}), **sizes(m.text, *names), vocab_size=m.text.vocab_size,
                max_position_embeddings=m.text.get("max_len", 0) or config.data.max_len)
    vision = dict(hf.get("vision_config", {}), **sizes(m.image, *names),
                  image_size=config.data.image_size, patch_size=m.image.patch, num_channels=3)
    hf.update(model_type="clip", text_config=text, vision_config=vision,
              projection_dim=m.embed_dim,
              logit_scale_init_value=float(m.get("logit_scale_init", 2.6592)))
  elif arch.startswith("ViT"):
    hf.update(model_type="vit", **sizes(m.image, *_BERT_NAMES), image_size=config.data.image_size,
              patch_size=m.image.patch, num_channels=3, qkv_bias=True)
    if m.image.get("num_classes"):
      hf.update(_labels(hf, m.image.num_classes))
  elif arch.startswith("ResNet"):
    size = resnet_size(m.image)
    hf.update(model_type="resnet", num_channels=3, embedding_size=size["stem_width"],
              hidden_sizes=list(size["widths"]), depths=list(size["depths"]),
              layer_type="bottleneck" if size["bottleneck"] else "basic", hidden_act="relu",
              downsample_in_first_stage=False, downsample_in_bottleneck=False)
    if m.image.get("num_classes"):
      hf.update(_labels(hf, m.image.num_classes))
  elif arch.startswith("Bert"):
    hf.update(model_type="bert", **sizes(m.text, *_BERT_NAMES), vocab_size=m.text.vocab_size,
              max_position_embeddings=m.text.get("max_len", 0) or config.data.max_len,
              type_vocab_size=m.text.type_vocab, position_embedding_type="absolute",
              tie_word_embeddings=True)
  else:
    g = sizes(m.text, "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
              "layer_norm_epsilon")
    g["activation_function"] = {"gelu_pytorch_tanh": "gelu_new"}.get(g["activation_function"],
                                                                     g["activation_function"])
    hf.update(model_type="gpt2", **g, vocab_size=m.text.vocab_size,
              n_positions=m.text.get("max_len", 0) or config.data.max_len,
              tie_word_embeddings=True)
  return hf
