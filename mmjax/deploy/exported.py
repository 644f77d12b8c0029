"""Run an `mmjax export` directory: numpy, JAX, PIL and tokenizers only.

  exported = mmjax.load_exported("exports/digits")
  exported.manifest                   # manifest.json: functions, specs, class names, ...
  exported.functions["image"](x)      # numpy in, numpy out; any batch size
  exported.embed_images([pil_or_path, ...])     # [N, E] (or [N, D] pooled without a joint space)
  exported.embed_texts(["a red circle", ...])   # [N, E]
  exported.classify(images)                     # class probabilities [N, C] (.class_names)
  exported.zeroshot(images, ["circle", "square"])   # label probabilities [N, C]
  exported.caption(images)                      # greedy captions (a captioner's export)

This module imports nothing else from mmjax, so a process that serves an export never
loads mmjax's model code, Flax or Orbax (`import mmjax` is lazy; see mmjax/__init__.py).
Keep it that way: the server (`mmjax serve --export DIR`) relies on this interface.
The image transform and the tokenization are re-done here from preprocess.json and
tokenizer.json, step for step as mmjax.io.preprocess and mmjax.data.tokenizer do them.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable, Sequence

import jax
import numpy as np
import tokenizers
from PIL import Image

FORMAT_VERSION = 1


class ExportedError(ValueError):
  """An export directory that cannot be run, or input it cannot take."""


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """preprocess.json: PIL resize of the uint8 RGB image ((h, w), or an int: the shortest
  side), center crop, rescale in float64 then float32, (x - mean) / std in float32."""
  resize: tuple[int, int] | int | None
  crop: tuple[int, int] | None
  resample: int
  rescale: float | None
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None

  @classmethod
  def from_json(cls, d: dict) -> "ImageTransform":
    resize = d["resize"]
    return cls(tuple(resize) if isinstance(resize, list) else resize,
               tuple(d["crop"]) if d.get("crop") else None, int(d["resample"]),
               d.get("rescale"), tuple(d["mean"]) if d.get("mean") else None,
               tuple(d["std"]) if d.get("std") else None)

  def __call__(self, image) -> np.ndarray:
    """A PIL image, uint8 [H, W(, 3)] array or image path -> float32 [h, w, 3]."""
    if isinstance(image, (str, pathlib.Path)):
      try:
        with Image.open(image) as im:
          image = im.convert("RGB")
      except OSError as e:             # missing, unreadable, not an image, truncated
        raise ExportedError(f"image {str(image)!r} is not a readable image ({e})") from None
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    pil = pil.convert("RGB")
    if isinstance(self.resize, int):
      w, h = pil.size
      short, long = (w, h) if w <= h else (h, w)
      new_long = int(self.resize * long / short)
      pil = pil.resize((self.resize, new_long) if w <= h else (new_long, self.resize),
                       resample=self.resample)
    elif self.resize is not None:
      pil = pil.resize((self.resize[1], self.resize[0]), resample=self.resample)
    x = np.asarray(pil)                                          # uint8 [H, W, 3]
    if self.crop is not None:
      x = _center_crop(x, self.crop)
    if self.rescale is not None:
      x = (x.astype(np.float64) * self.rescale).astype(np.float32)
    x = x.astype(np.float32)
    if self.mean is not None:
      x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return x


def _center_crop(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  h, w = size
  pad_h, pad_w = max(h - x.shape[0], 0), max(w - x.shape[1], 0)
  if pad_h or pad_w:
    top, left = -(-pad_h // 2), -(-pad_w // 2)
    x = np.pad(x, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
  top, left = (x.shape[0] - h) // 2, (x.shape[1] - w) // 2
  return x[top:top + h, left:left + w]


@dataclasses.dataclass(frozen=True)
class TextTransform:
  """`[CLS] tokens [SEP]` (truncated so that [SEP] stays last), padded to max_len."""
  tokenizer: object          # tokenizers.Tokenizer
  max_len: int
  cls_id: int
  sep_id: int
  pad_id: int

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids, mask) int32 [N, max_len]."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    ids = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.max_len), np.int32)
    for row, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
      tokens = [self.cls_id] + enc.ids[:self.max_len - 2] + [self.sep_id]
      ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
    return ids, mask


def _read_manifest(path: pathlib.Path) -> dict:
  file = path / "manifest.json"
  if not file.is_file():
    raise ExportedError(f"{path}: no manifest.json (not an `mmjax export` directory)")
  try:
    manifest = json.loads(file.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ExportedError(f"{file}: unreadable ({e})") from None
  if manifest.get("format") != "stablehlo":
    raise ExportedError(f"{path}: a --format {manifest.get('format')} export; load_exported "
                        f"runs stablehlo exports (run .onnx files with onnxruntime)")
  if manifest.get("format_version", 0) > FORMAT_VERSION:
    raise ExportedError(f"{file}: format_version {manifest['format_version']} is newer than "
                        f"this mmjax reads ({FORMAT_VERSION})")
  return manifest


def _unflat(named) -> dict:
  """{"a/b/kernel": array} -> nested dicts (the exported functions' first input)."""
  tree: dict = {}
  for key, value in named.items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


class Exported:
  """An export directory's functions, bound to its weights, plus its preprocessing.

  manifest: manifest.json. What a server reads from it: "functions" (name -> "inputs" and
    "outputs", each {"name", "shape", "dtype"}; "b" and "n" are symbolic sizes),
    "embed_dim" (0: no joint embedding), "classify_input" ("image" | "text" | "fusion" |
    "": no classifier), "class_names", "image_size" ([h, w] or None), "max_len",
    "logit_scale" (exp of the learned one, <= 100), "zeroshot" ({"templates",
    "ensemble"}), "has_decoder", "caption" ({"max_tokens", "eos_id"} or None), "step",
    "config_hash", "mmjax_version", "platforms".
  functions: name -> f(*numpy arrays) -> numpy array, the inputs and output as
    manifest["functions"][name] specifies them (one compilation per distinct shape):
    "image" (image) -> [b, E]; "text" (text, text_mask) -> [b, E]; "zeroshot" (image,
    text, text_mask) -> logits [b, n]; "classify" (the classifier's inputs) -> [b, C];
    "caption" (image) -> token ids [b, max_tokens].
  """

  def __init__(self, path):
    self.path = pathlib.Path(path).expanduser().absolute()
    self.manifest = _read_manifest(self.path)
    m = self.manifest
    try:
      with np.load(self.path / m["variables"]["file"]) as named:
        variables = _unflat({k: named[k] for k in named.files})
    except OSError as e:
      raise ExportedError(f"{self.path}: cannot read its weights ({e})") from None
    self._variables = jax.device_put(variables)
    self.functions: dict[str, Callable[..., np.ndarray]] = {
        name: self._bind(name, entry) for name, entry in m["functions"].items()}
    self.image_transform = None
    if m.get("preprocess"):
      pre = json.loads((self.path / m["preprocess"]).read_text(encoding="utf-8"))
      self.image_transform = ImageTransform.from_json(pre)
    self.text_transform = None
    if m.get("tokenizer"):
      tok = m["tokenizer"]
      self.text_transform = TextTransform(
          tokenizers.Tokenizer.from_file(str(self.path / tok["file"])), int(m["max_len"]),
          int(tok["cls_id"]), int(tok["sep_id"]), int(tok["pad_id"]))

  def _bind(self, name: str, entry: dict) -> Callable[..., np.ndarray]:
    file = self.path / entry["file"]
    try:
      exp = jax.export.deserialize(bytearray(file.read_bytes()))
    except OSError as e:
      raise ExportedError(f"{file}: cannot read ({e})") from None
    platform = jax.export.default_export_platform()      # "cpu", "cuda", "rocm", "tpu"
    if platform not in exp.platforms:
      raise ExportedError(f"{file}: exported for {', '.join(exp.platforms)}; this process "
                          f"runs on {platform}")
    specs = entry["inputs"]
    run = jax.jit(exp.call)

    def call(*inputs) -> np.ndarray:
      if len(inputs) != len(specs):
        raise ExportedError(f"{name} takes {len(specs)} inputs "
                            f"({', '.join(s['name'] for s in specs)}); got {len(inputs)}")
      arrays = [np.asarray(x, s["dtype"]) for x, s in zip(inputs, specs)]
      sizes: dict[str, int] = {}      # symbolic dimension -> the size the inputs give it
      for x, s in zip(arrays, specs):
        if x.ndim != len(s["shape"]) or any(
            sizes.setdefault(d, n) != n if isinstance(d, str) else d != n
            for d, n in zip(s["shape"], x.shape)) or 0 in x.shape:
          raise ExportedError(f"{name}: input {s['name']} has shape {list(x.shape)}; "
                              f"expected {s['shape']} (symbolic sizes >= 1, the same in "
                              f"every input: {sizes})")
      return np.asarray(run(self._variables, *arrays))

    call.__name__ = name
    return call

  # -- preprocessing -----------------------------------------------------------------

  @property
  def class_names(self) -> list[str]:
    return list(self.manifest.get("class_names", []))

  def image_rows(self, images) -> np.ndarray:
    """PIL images, uint8 arrays or paths -> the model's input float32 [N, h, w, 3]."""
    if self.image_transform is None:
      raise ExportedError(f"{self.path}: this model takes no images")
    if not len(images):
      raise ExportedError("no images given")
    return np.stack([self.image_transform(im) for im in images])

  def text_rows(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids, mask) int32 [N, max_len]."""
    if self.text_transform is None:
      raise ExportedError(f"{self.path}: this model takes no text")
    return self.text_transform(texts)

  def _function(self, name: str) -> Callable[..., np.ndarray]:
    if name not in self.functions:
      raise ExportedError(f"{self.path}: has no {name!r} function (it has "
                          f"{', '.join(self.functions) or 'none'}; see mmjax export --what)")
    return self.functions[name]

  # -- what a user calls -------------------------------------------------------------

  def embed_images(self, images) -> np.ndarray:
    """-> [N, E] unit embeddings (pooled features [N, D] for a model without embed_dim)."""
    return self._function("image")(self.image_rows(images))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    return self._function("text")(*self.text_rows(texts))

  def classify(self, images=None, texts: Sequence[str] | None = None) -> np.ndarray:
    """Class probabilities [N, C] (columns: `class_names`) of images, texts or both, as
    the classifier reads them (manifest["classify_input"])."""
    fn = self._function("classify")
    reads = self.manifest["classify_input"]
    args = []
    if reads in ("image", "fusion"):
      if images is None:
        raise ExportedError(f"{self.path}: its classifier reads images; pass images=")
      args.append(self.image_rows(images))
    if reads in ("text", "fusion"):
      if texts is None:
        raise ExportedError(f"{self.path}: its classifier reads text; pass texts=")
      args.extend(self.text_rows(texts))
    return _softmax(fn(*args))

  def zeroshot(self, images, labels: Sequence[str], templates: Sequence[str] | None = None,
               ensemble: str | None = None) -> np.ndarray:
    """Probabilities [N, C] over `labels` for each image. Each label's prompts are
    `templates` (default: the run's zero-shot eval's, else "{}") filled with it; its logit
    is the mean ("mean") or best ("max") of its prompts' logit_scale * cosine."""
    if not labels:
      raise ExportedError("zeroshot needs at least one label")
    z = self.manifest.get("zeroshot", {})
    templates = list(templates or z.get("templates") or ["{}"])
    ensemble = ensemble or z.get("ensemble", "mean")
    if ensemble not in ("mean", "max"):
      raise ExportedError(f"zero-shot ensemble {ensemble!r}: expected mean or max")
    prompts = [t.format(label) for label in labels for t in templates]    # class-major
    logits = self._function("zeroshot")(self.image_rows(images), *self.text_rows(prompts))
    per_class = logits.reshape(logits.shape[0], len(labels), len(templates))
    return _softmax(per_class.mean(-1) if ensemble == "mean" else per_class.max(-1))

  def caption(self, images) -> list[str]:
    """A greedy caption of each image (a captioner's export: manifest["caption"])."""
    tokens = self._function("caption")(self.image_rows(images))          # [N, max_tokens]
    eos = self.manifest["caption"]["eos_id"]
    texts = []
    for row in tokens.tolist():
      row = row[:row.index(eos)] if eos in row else row
      texts.append(self.text_transform.tokenizer.decode(row, skip_special_tokens=True))
    return texts


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def load_exported(path) -> Exported:
  """An `mmjax export` directory (--format stablehlo), ready to run."""
  return Exported(path)
