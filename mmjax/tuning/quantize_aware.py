"""Quantization-aware fine-tuning: train through int8 so that `mmjax quantize` loses less.

  config.finetune.quantize = dict(weight="int8", act="int8")   # or act="" (weights only)

The run trains the model wrapped by qwix's QT provider (mmjax/models/quantized.py
`qt_model`): every Dense multiplies int8-rounded weights (and, with act="int8", inputs)
in the forward pass, gradients pass straight through the rounding, and the params stay
float. Its evaluations (and `mmjax eval` of the workdir) run the same fake-quantized
forward; `mmjax quantize --mode <the same mode>` then stores real int8 weights.
"""
from __future__ import annotations

from typing import Any

from mmjax.models import quantized

DEFAULTS = dict(weight="", act="")
# (weight, act) -> the mmjax quantize mode it trains for.
MODES = {("int8", ""): "int8-weight", ("int8", "int8"): "w8a8"}


def mode_of(ft) -> str | None:
  """The quantize mode config.finetune.quantize trains for; None when it is off."""
  given = (ft or {}).get("quantize") or {}
  given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"finetune.quantize has unknown keys {unknown}; known: {sorted(DEFAULTS)}")
  q = {**DEFAULTS, **given}
  if not q["weight"] and not q["act"]:
    return None
  key = (q["weight"], q["act"])
  if key not in MODES:
    raise ValueError(f"finetune.quantize={q}: supported are "
                     f"{[dict(weight=w, act=a) for w, a in MODES]}")
  return MODES[key]


def qat_model(model, config) -> Any:
  """`model` for training and evaluating `config`: fake-quantized when
  config.finetune.quantize asks for it, else `model` itself."""
  mode = mode_of(config.get("finetune"))
  if mode is None or (config.model.get("quantize") or {}).get("mode"):
    return model      # off, or the workdir is int8 already (mmjax quantize of a QAT run)
  quantized.check_quantizable(config.model, mode)
  return quantized.qt_model(model, mode)
