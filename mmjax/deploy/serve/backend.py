"""What the server runs, whatever it was loaded from: a backend has `info` (ModelInfo),
`functions` (name -> Function), `image_rows(pil_image)` and `text_rows(texts)`.

Every function takes and returns arrays with a leading batch axis:
  "image"    images [B, H, W, 3] float32            -> unit embeddings [B, E]
  "text"     ids, mask [B, L] int32                 -> unit embeddings [B, E]
  "classify" the classifier's inputs (image; ids, mask; or all three) -> logits [B, C]
  "caption"  images [B, H, W, 3]                    -> greedy tokens [B, N] int32

`ExportedBackend` runs an `mmjax export` directory (this module loads no model code);
`workdir_backend.ModelBackend` a workdir's or Hugging Face directory's Flax model.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from PIL import Image

from mmjax.deploy.exported import Exported, load_exported

Arrays = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class Function:
  fn: Callable[..., np.ndarray]
  example: Arrays                     # one row of each input, for warm-up


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What the routes (and GET /v1/info) need to know about the model."""
  source: str                         # the workdir or export directory
  embed_dim: int                      # 0: no joint embedding (no embed/zeroshot/similarity)
  classify_input: str                 # "image" | "text" | "fusion" | "" (no classifier)
  class_names: tuple[str, ...]
  image_size: tuple[int, int] | None
  max_len: int
  logit_scale: float                  # zero-shot softmax temperature, exp(learned), <= 100


def examples(info: ModelInfo, text_rows: Callable[[list[str]], Arrays] | None
             ) -> tuple[Arrays, Arrays]:
  """(one image row, one text row) for warm-up; () where the model takes no such input."""
  image = () if info.image_size is None else (np.zeros((1, *info.image_size, 3), np.float32),)
  return image, text_rows(["warm-up"]) if text_rows else ()


class ExportedBackend:
  """An `mmjax export` directory (--format stablehlo): its image, text and classify
  functions; its exported zeroshot is not used (the server combines the embeddings)."""

  def __init__(self, exported: Exported):
    self.exported = exported
    m = exported.manifest
    self.info = ModelInfo(
        source=str(exported.path), embed_dim=int(m.get("embed_dim", 0)),
        classify_input=m.get("classify_input", ""), class_names=tuple(exported.class_names),
        image_size=tuple(m["image_size"]) if m.get("image_size") else None,
        max_len=int(m.get("max_len", 0)), logit_scale=float(m.get("logit_scale", 0.0)))

  @classmethod
  def from_path(cls, path) -> "ExportedBackend":
    return cls(load_exported(path))

  def image_rows(self, image: Image.Image) -> np.ndarray:
    return self.exported.image_rows([image])

  def text_rows(self, texts: list[str]) -> Arrays:
    return self.exported.text_rows(texts)

  @property
  def functions(self) -> dict[str, Function]:
    have = self.exported.functions
    image, text = examples(self.info,
                           self.text_rows if self.exported.text_transform else None)
    out = {}
    if self.info.embed_dim and "image" in have:
      out["image"] = Function(have["image"], image)
    if self.info.embed_dim and "text" in have:
      out["text"] = Function(have["text"], text)
    if "classify" in have and self.info.classify_input in ("image", "text", "fusion"):
      reads = {"image": image, "text": text, "fusion": image + text}
      out["classify"] = Function(have["classify"], reads[self.info.classify_input])
    return out
