"""`ModelBackend`: a model loaded with `mmjax.io.load` (an mmjax workdir or a Hugging Face
directory), its functions (see backend.py) jitted once per batch size; `WorkdirInputs`,
the part of it a front end of `--workers` needs (preprocessing and tokenizer only)."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from PIL import Image

from mmjax import io
from mmjax.deploy.export import has_decoder
from mmjax.deploy.serve.backend import Arrays, Function, ModelInfo, examples
from mmjax.generate import decode

CAPTION_TOKENS = 32              # at most; fewer where the decoder's context is shorter


class WorkdirInputs:
  """A workdir's (or HF directory's) image preprocessing and tokenizer, and the model's
  `info`: images and texts to rows, tokens to captions. All that a front end of `mmjax
  serve --workers N` loads (`io.load(..., params=False)`: no weights, no device)."""

  def __init__(self, loaded: io.Loaded, info: ModelInfo):
    self.loaded, self.info = loaded, info
    self.tokenizer, self.preprocess = loaded.tokenizer, loaded.preprocess

  def image_rows(self, image: Image.Image) -> np.ndarray:
    """One RGB image -> the model's input row [1, H, W, 3]."""
    return self.preprocess(image)[None]

  def text_rows(self, texts: list[str]) -> Arrays:
    """-> (ids, mask) [len(texts), max_len] int32."""
    ids, mask = self.tokenizer.encode(texts, self.info.max_len)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

  def caption_text(self, tokens: np.ndarray) -> str:
    """One row of "caption" tokens -> the text before its first EOS."""
    row = list(tokens)
    end = row.index(self.tokenizer.eos_id) if self.tokenizer.eos_id in row else len(row)
    return self.tokenizer.decode(np.asarray(row[:end], np.int32))


class ModelBackend(WorkdirInputs):
  """WorkdirInputs and the model's jitted functions."""

  def __init__(self, loaded: io.Loaded):
    self.model = loaded.model()
    self.variables = jax.device_put(loaded.variables)
    cfg = loaded.config
    preprocess = loaded.preprocess
    classifier = cfg.model.get("classifier") or {}
    num_classes = classifier.get("num_classes", 0)
    classify_input = classifier.get("input", "image") if num_classes else ""
    if classify_input == "text_tokens":     # a token tagger: one answer per token, not served
      classify_input = ""
    image_size = None
    if preprocess is not None:
      image_size = preprocess.output_size
      if image_size is None:
        raise ValueError(f"{loaded.path}: its image preprocessing keeps the aspect ratio "
                         f"(no crop), so images cannot be batched")
    scale = 0.0
    if self.model.embed_dim:
      scale = float(np.exp(min(float(loaded.params["logit_scale"]), np.log(100.0))))
    super().__init__(loaded, ModelInfo(
        source=str(loaded.path), embed_dim=self.model.embed_dim,
        classify_input=classify_input, class_names=_class_names(loaded.label_names, num_classes),
        image_size=image_size, max_len=int(cfg.data.get("max_len", 64)), logit_scale=scale))

  @classmethod
  def from_path(cls, path, step: int | None = None) -> "ModelBackend":
    return cls(io.load(path, step))

  @functools.cached_property
  def functions(self) -> dict[str, Function]:
    info = self.info
    image, text = examples(info, self.text_rows if self.tokenizer else None)
    out = {}
    if info.embed_dim and image:
      out["image"] = self._jit(lambda m, x: m.encode_image(x)[0], image)
    if info.embed_dim and text:
      out["text"] = self._jit(lambda m, ids, mask: m.encode_text(ids, mask)[0], text)
    if info.classify_input == "image":
      out["classify"] = self._jit(lambda m, x: m.classify({"image": x}), image)
    elif info.classify_input == "text":
      out["classify"] = self._jit(
          lambda m, ids, mask: m.classify({"text": ids, "text_mask": mask}), text)
    elif info.classify_input == "fusion":
      out["classify"] = self._jit(
          lambda m, x, ids, mask: m.classify({"image": x, "text": ids, "text_mask": mask}),
          image + text)
    if has_decoder(self.model) and self.tokenizer is not None and image:
      out["caption"] = Function(self._caption, image)
    return out

  def _jit(self, method: Callable, example: Arrays) -> Function:
    """`method(module, *arrays)` bound to the model's variables, jitted; numpy in and out
    (numpy arguments take jit's C++ dispatch path; a jnp.asarray of each first was an
    eager dispatch per argument, 8% of the model thread's busy time under serve_load)."""
    run = jax.jit(lambda v, *xs: self.model.apply(v, *xs, method=method))
    return Function(lambda *xs: np.asarray(run(self.variables, *xs)), example)

  def _caption(self, images: np.ndarray) -> np.ndarray:
    """Greedy captions [B, N] from BOS alone (`decode` jits once per batch size)."""
    tok = self.tokenizer
    bos = np.full((len(images), 1), tok.prompt_ids("")[0], np.int32)
    steps = min(CAPTION_TOKENS, self.model.text_tower.max_len - 1)
    got = decode(self.model, self.variables, bos, np.ones_like(bos), images=images,
                 max_new_tokens=steps, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return np.asarray(got.tokens[:, 0])


def _class_names(label_names: dict, num_classes: int) -> tuple[str, ...]:
  """The classifier's class names: the workdir's "label" field's (else its only field's),
  else "0", "1", ..."""
  names = label_names.get("label") or (next(iter(label_names.values()))
                                       if len(label_names) == 1 else None)
  if names and len(names) == num_classes:
    return tuple(str(n) for n in names)
  return tuple(str(i) for i in range(num_classes))
