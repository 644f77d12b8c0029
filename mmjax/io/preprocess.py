"""A Hugging Face image processor's transform (CLIP, ViT, ConvNeXT/ResNet) on numpy and PIL.

The same steps in the same order and precision as transformers' PIL backend:
RGB conversion, PIL resize of the uint8 image (shortest side or fixed size, the
processor's resampling filter), center crop with (H - h) // 2 offsets, rescale
in float64 then float32, and (x - mean) / std in float32. Output is
channels-last float32 [H, W, 3], the layout mmjax's ViT takes.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
from PIL import Image

from mmjax.io.jsonfile import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# transformers' defaults per processor class, for keys a preprocessor_config.json leaves out.
_DEFAULTS = {
    "CLIPImageProcessor": dict(size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                               crop_size=224, image_mean=OPENAI_CLIP_MEAN,
                               image_std=OPENAI_CLIP_STD, square=False),
    "ViTImageProcessor": dict(size={"height": 224, "width": 224}, resample=2,
                              do_center_crop=False, crop_size=224, image_mean=HALF,
                              image_std=HALF, square=True),
    # ResNet checkpoints' processor. Its resize crops by itself: a shortest edge s < 384
    # is resized to int(s / crop_pct) and center-cropped to s x s; s >= 384 is warped to
    # s x s.
    "ConvNextImageProcessor": dict(size={"shortest_edge": 384}, resample=3,
                                   do_center_crop=False, crop_size=224, crop_pct=224 / 256,
                                   image_mean=HALF, image_std=HALF, square=False),
}


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
  resize: tuple[int, int] | int | None   # (height, width), or an int: the shortest side
  crop: tuple[int, int] | None           # (height, width) center crop
  resample: int = Image.Resampling.BICUBIC
  rescale: float | None = 1 / 255
  mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
  std: tuple[float, ...] | None = OPENAI_CLIP_STD

  @classmethod
  def from_hf(cls, cfg: dict) -> "ImagePreprocess":
    """From a preprocessor_config.json dict (CLIPImageProcessor, ViTImageProcessor or
    ConvNextImageProcessor; older files name a feature extractor instead)."""
    kind = (cfg.get("image_processor_type") or cfg.get("feature_extractor_type", "").replace(
        "FeatureExtractor", "ImageProcessor") or "CLIPImageProcessor")
    kind = kind.removesuffix("Fast").removesuffix("Pil")
    if kind not in _DEFAULTS:
      raise ValueError(f"image processor {kind!r} is not supported; mmjax has {sorted(_DEFAULTS)}")
    c = {**_DEFAULTS[kind], **{k: v for k, v in cfg.items() if v is not None}}
    resize = None
    if c.get("do_resize", True):
      size = c["size"]
      if isinstance(size, int):
        size = {"height": size, "width": size} if c["square"] else {"shortest_edge": size}
      if set(size) == {"shortest_edge"}:
        resize = int(size["shortest_edge"])
      elif set(size) == {"height", "width"}:
        resize = (int(size["height"]), int(size["width"]))
      else:
        raise ValueError(f"image processor size {size} is not supported")
    crop = None
    if c["do_center_crop"]:
      crop = c["crop_size"]
      crop = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
    if kind == "ConvNextImageProcessor" and resize is not None:
      if crop is not None:
        raise ValueError("ConvNextImageProcessor with do_center_crop is not supported")
      if resize < 384:
        resize, crop = int(resize / c["crop_pct"]), (resize, resize)
      else:
        resize = (resize, resize)
    return cls(resize=resize, crop=crop, resample=int(c["resample"]),
               rescale=c.get("rescale_factor", 1 / 255) if c.get("do_rescale", True) else None,
               mean=tuple(c["image_mean"]) if c.get("do_normalize", True) else None,
               std=tuple(c["image_std"]) if c.get("do_normalize", True) else None)

  @classmethod
  def load(cls, directory) -> "ImagePreprocess | None":
    path = pathlib.Path(directory) / "preprocessor_config.json"
    if not path.is_file():
      return None
    return cls.from_hf(read_json(path, "a Hugging Face image processor config"))

  def to_hf(self) -> dict:
    """A preprocessor_config.json dict that transformers reads back as the same transform."""
    is_clip = isinstance(self.resize, int) or self.resize is None
    out = dict(image_processor_type="CLIPImageProcessor" if is_clip else "ViTImageProcessor",
               do_resize=self.resize is not None, resample=int(self.resample),
               do_center_crop=self.crop is not None, do_rescale=self.rescale is not None,
               rescale_factor=self.rescale or 1 / 255, do_normalize=self.mean is not None,
               image_mean=list(self.mean or HALF), image_std=list(self.std or HALF),
               do_convert_rgb=True)
    if self.resize is not None:
      out["size"] = ({"shortest_edge": self.resize} if isinstance(self.resize, int)
                     else {"height": self.resize[0], "width": self.resize[1]})
    if self.crop is not None:
      out["crop_size"] = {"height": self.crop[0], "width": self.crop[1]}
    return out

  @property
  def output_size(self) -> tuple[int, int] | None:
    return self.crop or (self.resize if isinstance(self.resize, tuple) else None)

  def __call__(self, image) -> np.ndarray:
    """One PIL image or uint8 [H, W(, 3)] array -> float32 [h, w, 3]."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    pil = pil.convert("RGB")
    if self.resize is not None:
      if isinstance(self.resize, int):   # shortest side -> resize, the other keeps the ratio
        w, h = pil.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize, int(self.resize * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
      else:
        size = (self.resize[1], self.resize[0])
      pil = pil.resize(size, resample=self.resample)
    x = np.asarray(pil)                                        # uint8 [H, W, 3]
    if self.crop is not None:
      x = center_crop(x, self.crop)
    if self.rescale is not None:
      x = (x.astype(np.float64) * self.rescale).astype(np.float32)
    x = x.astype(np.float32)
    if self.mean is not None:
      x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return x

  def batch(self, images) -> np.ndarray:
    """A list of images -> float32 [B, h, w, 3] (they must come out the same size)."""
    return np.stack([self(im) for im in images])


def center_crop(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[H, W, C] -> [h, w, C], zero-padded evenly first where the image is smaller."""
  h, w = size
  pad_h, pad_w = max(h - x.shape[0], 0), max(w - x.shape[1], 0)
  if pad_h or pad_w:
    top, left = -(-pad_h // 2), -(-pad_w // 2)
    x = np.pad(x, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
  top, left = (x.shape[0] - h) // 2, (x.shape[1] - w) // 2
  return x[top:top + h, left:left + w]
