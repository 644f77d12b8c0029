"""`from_pretrained` / `save_pretrained`: a local Hugging Face directory <-> an mmjax model.

A directory holds config.json + model.safetensors, and optionally tokenizer
files and preprocessor_config.json; a sentence-transformers directory
(modules.json, 1_Pooling/) also says how its embeddings are pooled. Only
safetensors are read: nothing is unpickled, and torch is never imported.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from mmjax.io import hf_config, hf_params
from mmjax.io.hf_tokenizer import hf_tokenizer
from mmjax.io.jsonfile import read_json
from mmjax.io.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from mmjax.models import build_model, variables
from mmjax.models.lora import merge_lora

log = logging.getLogger("mmjax")


@dataclasses.dataclass
class Pretrained:
  """What `from_pretrained` returns. Use it as

    emb, out = p.model.apply({"params": p.params}, ids, mask, method="encode_text")
    emb, out = p.model.apply(p.variables, p.preprocess.batch(images), method="encode_image")

  `out` holds "tokens", "pooled" and, with a head, "logits". `p.variables` is the params
  with BatchNorm's running statistics (a ResNet's), which `apply` needs too.
  """
  architecture: str                     # the HF architecture, e.g. "CLIPModel"
  config: ml_collections.ConfigDict     # {"data": ..., "model": ...} for build_model
  model: Any                            # mmjax MultimodalModel
  params: dict
  tokenizer: Any | None                 # mmjax Tokenizer (None if the directory has none)
  preprocess: ImagePreprocess | None    # the checkpoint's image transform (image models)
  hf_config: dict                       # the original config.json
  batch_stats: dict = dataclasses.field(default_factory=dict)   # BatchNorm's; {} if none

  @property
  def variables(self) -> dict:
    return variables(self.params, self.batch_stats)


def init_inputs(config) -> tuple[tuple, str | None]:
  """(args, method) for `model.init` that touch every param of `config.model`."""
  m, d = config.model, config.data
  image = np.zeros((1, d.image_size, d.image_size, 3), np.float32) if m.get("image") else None
  ids = np.zeros((1, d.max_len), np.int32) if m.get("text") else None
  if image is not None and ids is not None:
    return ({"image": image, "text": ids, "text_mask": np.ones_like(ids)},), None
  if image is not None:
    return (image,), "encode_image"
  return (ids, np.ones_like(ids)), "encode_text"


def init_variables(model, config, rng=None) -> dict:
  """A fresh model's params, with its BatchNorm statistics under "batch_stats" when it
  has any: the tree `hf_params.import_params` reads and writes."""
  args, method = init_inputs(config)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  got = model.init({"params": rng}, *args, method=method)
  stats = got.get("batch_stats")
  return dict(got["params"], batch_stats=stats) if stats else dict(got["params"])


def init_params(model, config, rng=None) -> dict:
  return _split(init_variables(model, config, rng))[0]


def _split(tree: dict) -> tuple[dict, dict]:
  """(params, batch_stats) of an `init_variables`-like tree."""
  tree = dict(tree)
  stats = tree.pop("batch_stats", {})
  return tree, stats


def _sentence_pooling(directory: pathlib.Path) -> str | None:
  """sentence-transformers' pooling mode ('mean' or 'cls'), None for a plain HF directory."""
  path = directory / "1_Pooling" / "config.json"
  if not (directory / "modules.json").is_file() or not path.is_file():
    return None
  pooling = read_json(path, "sentence-transformers' pooling config")
  for key, mode in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls")):
    if pooling.get(key):
      return mode
  raise hf_config.UnsupportedModel(f"{path}: only mean or cls pooling is supported")


def _max_len(directory: pathlib.Path) -> int:
  """The text length the checkpoint was used with (sentence-transformers' max_seq_length)."""
  path = directory / "sentence_bert_config.json"
  if not path.is_file():
    return 0
  return int(read_json(path, "sentence-transformers' config").get("max_seq_length", 0))


def is_hf_dir(path: pathlib.Path) -> bool:
  return (path / "model.safetensors").is_file()


def read_config(directory) -> dict:
  return read_json(pathlib.Path(directory) / "config.json",
                   "a Hugging Face model config (config.json beside model.safetensors)")


def _weights(directory: pathlib.Path) -> pathlib.Path:
  weights = directory / "model.safetensors"
  if not weights.is_file():
    raise FileNotFoundError(f"{directory}: no model.safetensors (mmjax reads safetensors only; "
                            f"a pytorch_model.bin is never unpickled)")
  return weights


def _tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  path = _weights(directory)
  try:
    return load_file(str(path))
  except SafetensorError as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _tensor_names(directory: pathlib.Path) -> set[str]:
  """The tensor names of model.safetensors, from its header alone (no weights read)."""
  path = _weights(directory)
  try:
    with safe_open(str(path), framework="numpy") as f:
      return set(f.keys())
  except SafetensorError as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def load_params(path, config, *, allow_missing: str = "", ignore: str = "") -> dict:
  """The checkpoint in HF directory `path` as params of the mmjax model `config` describes.

  Strict: any missing, unexpected or mis-shaped tensor raises `KeyMismatch` listing them
  all. allow_missing: regex of mmjax param paths (a new head, a fusion) initialised
  fresh instead; ignore: regex of HF tensor names to leave unused.
  """
  return load_variables(path, config, allow_missing=allow_missing, ignore=ignore)[0]


def load_variables(path, config, *, allow_missing: str = "", ignore: str = ""
                   ) -> tuple[dict, dict]:
  """(params, BatchNorm statistics ({} when none)) of `load_params`."""
  directory = pathlib.Path(path).expanduser()
  arch = hf_config.architecture(read_config(directory))
  tensors = _tensors(directory)
  if _sentence_pooling(directory):   # sentence-transformers pools tokens itself, no pooler
    ignore = "|".join(filter(None, (ignore, r"^(bert\.)?pooler\.dense\.")))
  model = build_model(config)
  init = None
  if allow_missing:
    init = expected = init_variables(model, config)
  else:
    expected = jax.eval_shape(lambda: init_variables(model, config))
  imported = hf_params.import_params(tensors, arch, config, expected, init=init,
                                     allow_missing=allow_missing, ignore=ignore,
                                     source=str(directory / "model.safetensors"))
  return _split(jax.tree.map(jnp.asarray, imported))


def pretrained_config(path, *, image_size: int = 0, max_len: int = 0
                      ) -> tuple[ml_collections.ConfigDict, ImagePreprocess | None]:
  """(mmjax config with `model` and the `data` fields the model fixes, image
  preprocessing) of the HF directory `path`; reads no weights."""
  directory = pathlib.Path(path).expanduser()
  hf = read_config(directory)
  arch = hf_config.architecture(hf)
  keys = _tensor_names(directory)
  pool = _sentence_pooling(directory)
  has_pooler = f"{hf_params.detect_prefix(arch, keys)}pooler.dense.weight" in keys and not pool
  config = hf_config.to_mmjax(hf, pooler=has_pooler, text_pool=pool,
                              text_max_len=max_len or _max_len(directory),
                              image_size=image_size)
  preprocess = None
  if config.model.get("image"):
    preprocess = ImagePreprocess.load(directory) or _default_preprocess(arch, config)
    if preprocess.output_size not in (None, (config.data.image_size,) * 2):
      log.warning("%s: the image processor gives %s images; the model is built for %d",
                  directory, preprocess.output_size, config.data.image_size)
    config.data.mean, config.data.std = preprocess.mean, preprocess.std
  return config, preprocess


def from_pretrained(path, *, image_size: int = 0, max_len: int = 0, allow_missing: str = "",
                    ignore: str = "", dtype: str = "float32") -> Pretrained:
  """Load a local Hugging Face model directory as an mmjax model and its params.

  image_size: build the image tower for another resolution; its position
    embeddings are resampled (bilinear).
  max_len: padded text length of batches (default: the checkpoint's).
  allow_missing / ignore: see `load_params` (strict by default).
  """
  directory = pathlib.Path(path).expanduser()
  config, preprocess = pretrained_config(directory, image_size=image_size, max_len=max_len)
  hf = read_config(directory)
  arch = hf_config.architecture(hf)
  config.model.dtype = dtype
  tokenizer = hf_tokenizer(directory)
  text = config.model.get("text")
  if tokenizer is not None and text and tokenizer.vocab_size > text.vocab_size:
    raise hf_config.UnsupportedModel(
        f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
        f"embedding table only {config.model.text.vocab_size}")
  params, stats = load_variables(directory, config, allow_missing=allow_missing, ignore=ignore)
  return Pretrained(arch, config, build_model(config), params, tokenizer, preprocess, hf, stats)


def _default_preprocess(arch: str, config) -> ImagePreprocess:
  """The transformers default processor of `arch` at the model's resolution; a ResNet's
  is microsoft/resnet-50's (resize to s / 0.875, center crop s, bicubic, ImageNet
  mean/std)."""
  s = config.data.image_size
  if arch.startswith("ResNet"):
    return ImagePreprocess.from_hf(dict(
        image_processor_type="ConvNextImageProcessor", size={"shortest_edge": s},
        crop_pct=0.875, resample=3, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD))
  kind = "CLIPImageProcessor" if arch == "CLIPModel" else "ViTImageProcessor"
  size = {"shortest_edge": s} if arch == "CLIPModel" else {"height": s, "width": s}
  return ImagePreprocess.from_hf(dict(image_processor_type=kind, size=size, crop_size=s))


def merge_peft(config, params):
  """(config, params) with LoRA folded into the base kernels (finetune.lora_rank -> 0),
  which any HF architecture can hold; adapters have no HF counterpart: an error."""
  ft = config.get("finetune") or {}
  if ft.get("adapter_dim", 0):
    raise ValueError("the model has bottleneck adapters (finetune.adapter_dim="
                     f"{ft.adapter_dim}), which no Hugging Face architecture holds; export "
                     "a full or LoRA fine-tune instead")
  if not ft.get("lora_rank", 0):
    return config, params
  merged = merge_lora(params, ft.lora_alpha)
  config = ml_collections.ConfigDict(config.to_dict())
  config.finetune.lora_rank = 0
  return config, merged


def save_pretrained(directory, config, params, *, hf_config_base: dict | None = None,
                    tokenizer=None, preprocess: ImagePreprocess | None = None,
                    batch_stats: dict | None = None) -> pathlib.Path:
  """Write config.json + model.safetensors (+ tokenizer.json, preprocessor_config.json)
  that transformers loads as the HF architecture `config.model` expresses; a model with
  BatchNorm needs its `batch_stats` (running_mean / running_var)."""
  config, params = merge_peft(config, params)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  hf = hf_config.to_hf(config, hf_config_base)
  tree = dict(params, batch_stats=batch_stats) if batch_stats else params
  tensors = hf_params.export_params(tree, hf["architectures"][0], config)
  save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
  (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
  if tokenizer is not None:
    tokenizer.save(directory)
  if preprocess is not None:
    (directory / "preprocessor_config.json").write_text(
        json.dumps(preprocess.to_hf(), indent=2) + "\n")
  return directory
