"""Knowledge distillation: a frozen teacher's class logits in the student's train step.

  c.distill = dict(teacher="runs/teacher", step=-1, temperature=2.0)
  c.objectives = dict(classify=0.5, distill=0.5)       # hard labels + the teacher

The temperature is stated once, in config.distill; the loop hands it to the
`distill` objective (`distill_options`).

The teacher is an mmjax workdir (its own config.json builds its model, which may be
larger than the student's) or a Hugging Face directory (a ViTForImageClassification).
The train step runs it on the student's batch (after mixup), in eval mode, and the
`distill` objective reads its logits as outputs["teacher_class_logits"]. Its params are
replicated over the mesh and never updated or written.

Images reach the teacher as it was trained to see them: the student's normalisation
is undone and the teacher's applied, and they are resized (bilinear) when the two
image sizes differ. A teacher that reads text must share the student's tokenizer.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import io
from mmjax.data import get_tokenizer
from mmjax.models import build_model
from mmjax.objectives import DISTILL_TEMPERATURE

log = logging.getLogger("mmjax")
_DEFAULT_NORM = (0.5, 0.5, 0.5)   # the data pipeline's default mean and std


@dataclasses.dataclass
class Teacher:
  fn: Callable           # (params, batch) -> {name: array}; the student's loss sees teacher_<name>
  params: Any            # the teacher's variables (params + batch_stats), on the mesh
  sharding: Any          # of params


def _read(path: pathlib.Path, step: int, student_data):
  """(teacher config, model, variables) of an mmjax workdir or a Hugging Face directory."""
  loaded = io.load(path, None if step < 0 else step, what="distill.teacher")
  log.info("distill: teacher %s (%s%s)", path, loaded.kind,
           "" if loaded.step is None else f" step {loaded.step}")
  if loaded.kind == "hf":
    return loaded.config, loaded.model(), loaded.variables
  config = loaded.config
  return config, build_model(config, _text_vocab(config, student_data, path)), loaded.variables


def _text_vocab(config, student_data, path) -> int | None:
  """The vocabulary size of the teacher's text tower (None without one). A teacher whose
  classifier reads text sees the student's token ids, so both tokenizers must agree."""
  text = config.model.get("text")
  if not text:
    return None
  classifier = config.model.get("classifier") or {}
  if classifier.get("num_classes") and classifier.get("input", "image") != "image":
    if get_tokenizer(config.data).hf.get_vocab() != get_tokenizer(student_data).hf.get_vocab():
      raise ValueError(f"distill teacher {path} classifies from text, but its tokenizer "
                       f"differs from the student's (data.tokenizer): it would read "
                       f"meaningless token ids")
  return text.get("vocab_size", 0) or get_tokenizer(config.data).vocab_size


def _classifier(model, config, path) -> tuple[Callable, int]:
  """((params, batch) -> class logits [B, C], C) for the teacher's classification head:
  mmjax's `model.classifier`, or the image tower's own head (converted HF ViT)."""
  m = config.model
  num_classes = (m.get("classifier") or {}).get("num_classes", 0)
  if num_classes:
    return (lambda variables, batch: model.apply(variables, batch,
                                                 method=model.classify)), num_classes
  num_classes = (m.get("image") or {}).get("num_classes", 0)
  if num_classes:
    def tower_head(variables, batch):
      _, out = model.apply(variables, batch["image"], method=model.encode_image)
      return out["logits"]
    return tower_head, num_classes
  raise ValueError(f"distill teacher {path} has no classifier: its config sets neither "
                   f"model.classifier.num_classes nor model.image.num_classes")


def _image_adapter(teacher_data, student_data) -> Callable:
  """images [B, S, S, 3] normalised for the student -> as the teacher's data pipeline makes
  them (its mean/std, its image size). The identity when the two agree."""
  size, student_size = int(teacher_data.image_size), int(student_data.image_size)
  to_unit = [np.asarray(student_data.get(k, _DEFAULT_NORM), np.float32) for k in ("mean", "std")]
  to_teacher = [np.asarray(teacher_data.get(k, _DEFAULT_NORM), np.float32)
                for k in ("mean", "std")]
  same_norm = all(np.allclose(a, b) for a, b in zip(to_unit, to_teacher))
  if same_norm and size == student_size:
    return lambda images: images
  if size != student_size:
    log.info("distill: student images are resized %d -> %d for the teacher", student_size, size)

  def adapt(images):
    x = images * to_unit[1] + to_unit[0]                       # [B, S, S, 3] in [0, 1]
    if size != student_size:
      x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")
    return (x - to_teacher[0]) / to_teacher[1]

  return adapt


def distill_options(config) -> dict:
  """The `distill` objective's options: the temperature of config.distill, its one home."""
  if "temperature" in (config.get("objective_options", {}).get("distill") or {}):
    raise ValueError("objective_options.distill.temperature is not read: set "
                     "config.distill.temperature (the teacher's and the loss's temperature)")
  return {"temperature": float((config.get("distill") or {}).get("temperature",
                                                                 DISTILL_TEMPERATURE))}


def _check_options(config, num_classes: int, path) -> None:
  """The student must classify into the teacher's classes."""
  student_classes = (config.model.get("classifier") or {}).get("num_classes", 0)
  if student_classes != num_classes:
    raise ValueError(f"distill teacher {path} has {num_classes} classes but the student's "
                     f"model.classifier.num_classes is {student_classes}")
  if "distill" not in config.get("objectives", {}):
    raise ValueError(f"config.distill is set but config.objectives {sorted(config.objectives)} "
                     f"has no 'distill': the teacher would run for nothing")


def load_teacher(config, mesh) -> Teacher | None:
  """The frozen teacher `config.distill.teacher` names, replicated over `mesh`; None
  without `config.distill`."""
  if not config.get("distill"):
    return None
  if not config.distill.get("teacher"):
    raise ValueError("config.distill.teacher is empty: set it to the teacher's mmjax workdir "
                     "or Hugging Face directory (--config.distill.teacher=DIR)")
  path = pathlib.Path(config.distill.teacher).expanduser().absolute()
  teacher_config, model, params = _read(path, int(config.distill.get("step", -1)), config.data)
  logits_fn, num_classes = _classifier(model, teacher_config, path)
  _check_options(config, num_classes, path)
  adapt = _image_adapter(teacher_config.data, config.data)

  def fn(params, batch):
    if "image" in batch:
      batch = dict(batch, image=adapt(batch["image"]))
    return {"class_logits": logits_fn(params, batch).astype(jnp.float32)}

  sharding = NamedSharding(mesh, P())
  return Teacher(fn, jax.device_put(params, sharding), sharding)
