"""Models quantized by qwix: int8 weights, or int8 weights and activations (w8a8).

`config.model.quantize = dict(mode="int8-weight" | "w8a8", static=False)` (what `mmjax
quantize` writes) makes `build_model` return the post-training-quantized (PTQ) model,
whose params are the quantized tree as saved:

  <dense>/kernel/array/qvalue         int8 [I, O]
  <dense>/kernel/array/scale          float32 [1, O]: per output channel, absmax / 127
  <dense>/einsum0_lhs_scale/array     float32 [1, L, 1] (static w8a8 only): the input's
                                      calibrated scale per token position

Every Dense is quantized (attention q/k/v/out, MLPs, projections, poolers and heads);
the ViT patch embedding (a convolution), embeddings, norms and the products of two
activations (attention's q.k and weights.v, image-text similarities) stay in float.
w8a8 quantizes each Dense's input per token at run time (dynamic range), or with the
fixed scales that calibration on training data measured (static range, `static=True`).

`qt_model` is the same model for quantized training (qwix's QT: fake-quantized forward,
straight-through backward), what `config.finetune.quantize` trains with.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import qwix
from qwix._src.providers.ptq import WithAux   # qwix 0.1.8 exports no name for it

from mmjax.models.dense import plain_matmuls

MODES = {"int8-weight": dict(weight_qtype="int8"),
         "w8a8": dict(weight_qtype="int8", act_qtype="int8")}
# Modules whose own matmuls stay float: the patch embedding (qwix quantizes a convolution's
# weights only together with its input), Attention itself (its Dense children are
# quantized; q.k and weights.v multiply two activations), the token embedding (a table
# lookup, and a tied LM head's `attend`) and the model at the root (the similarities of
# the image and text embeddings).
KEEP_FLOAT = r"|(.*/)?(patch_embed|attn|cross_attn|token_embed)"
# The model's entry points that run Dense layers (evaluators and servers call them by name).
METHODS = ("__call__", "encode_image", "encode_text", "classify", "class_logits",
           "match_logits", "decode_text")


class NotQuantizable(ValueError):
  """A model (or a layer type in it) that qwix cannot quantize in the asked mode."""


def rules(mode: str, static: bool = False, qt: bool = False) -> list:
  """qwix rules for `mode`: the float modules first (the first rule that matches wins)."""
  if mode not in MODES:
    raise ValueError(f"quantize mode {mode!r}: expected one of {sorted(MODES)}")
  rule = qwix.QtRule if qt else qwix.QuantizationRule
  extra = {}
  if static:
    if "act_qtype" not in MODES[mode]:
      raise ValueError(f"static activation scales need activations quantized: mode {mode!r}")
    # A scale per token position (image patches sit at fixed positions). Calibration (a
    # QT model) keeps each example's absmax (no batch axes) for `calibrate` to take the
    # max over examples: qwix's own mean over them would clip every larger input.
    extra = dict(act_static_scale=True, act_batch_axes=() if qt else (0,))
  return [rule(module_path=KEEP_FLOAT), rule(module_path=".*", **MODES[mode], **extra)]


def check_quantizable(model_config, mode: str) -> None:
  """Raise NotQuantizable naming the layer type qwix cannot quantize in `mode`."""
  if mode not in MODES:
    raise NotQuantizable(f"quantize mode {mode!r}: expected one of {sorted(MODES)}")
  image = model_config.get("image") or {}
  if image.get("type", "vit") == "resnet":
    raise NotQuantizable(
        "the ResNet image tower is made of nn.Conv layers, and mmjax quantizes Dense "
        "(matmul) layers only: qwix quantizes a convolution's weights only together with "
        "its input and mmjax has no tested int8 convolution path; quantize a ViT model")
  if model_config.get("scan_layers", False):
    raise NotQuantizable("model.scan_layers=True stacks the blocks' Dense kernels in one "
                         "scanned layer, which mmjax's quantized path does not handle; "
                         "quantize a model trained with scan_layers=False")


def _is_saved_quantized(node: Any) -> bool:
  return isinstance(node, Mapping) and set(node) == {"array"}


def from_saved(params: Any) -> Any:
  """Saved params (plain nested dicts, as Orbax reads them back) -> the tree the PTQ model
  applies: each {"array": ...} node as qwix's WithAux (a QArray for weights)."""
  def convert(node):
    if _is_saved_quantized(node):
      array = node["array"]
      if isinstance(array, Mapping):
        array = qwix.QArray(**array)
      return WithAux(array, None)      # `how` is only read when quantizing float weights
    if isinstance(node, Mapping):
      return {k: convert(v) for k, v in node.items()}
    return node
  return convert(params)


def to_saved(params: Any) -> dict:
  """The PTQ model's params (WithAux / QArray leaves) as plain nested dicts of arrays."""
  out: dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    node = out
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return out


def _with_plain_matmuls(method):
  @functools.wraps(method)    # keeps Linen's "already wrapped" mark: no second wrapping
  def run(*args, **kwargs):
    with plain_matmuls():
      return method(*args, **kwargs)
  return run


def _quantized(model: nn.Module, provider, saved_params: bool) -> nn.Module:
  methods = [m for m in METHODS if hasattr(model, m)]
  qmodel = qwix.quantize_model(model, provider, methods=methods)
  parent = type(qmodel)
  fields = {m: _with_plain_matmuls(getattr(parent, m)) for m in methods}
  if saved_params:
    def apply(self, variables, *args, **kwargs):
      variables = dict(variables, params=from_saved(variables["params"]))
      return parent.apply(self, variables, *args, **kwargs)
    fields["apply"] = apply
  qmodel.__class__ = type(parent.__name__, (parent,), fields)
  return qmodel


def ptq_model(model: nn.Module, mode: str, static: bool = False) -> nn.Module:
  """`model` with its Dense layers quantized after training; `apply` takes the saved
  quantized params (see the module doc), `init` returns qwix's tree."""
  return _quantized(model, qwix.PtqProvider(rules(mode, static)), saved_params=True)


def qt_model(model: nn.Module, mode: str, static: bool = False) -> nn.Module:
  """`model` with fake-quantized Dense layers (float params): quantization-aware training,
  and, with `static`, calibration (apply with mutable=["quant_stats"] returns every Dense
  input's absmax per example and token, [B, L, 1], in qwix's quant_stats)."""
  return _quantized(model, qwix.QtProvider(rules(mode, static, qt=True)), saved_params=False)


def keep_quantize(config, saved_config):
  """`config` with `saved_config`'s model.quantize (a quantized workdir's), so that another
  config (its evals, data) can evaluate the quantized checkpoint."""
  quantize = (saved_config.get("model") or {}).get("quantize")
  if not quantize or (config.model.get("quantize") or {}) == quantize:
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.quantize = copy.deepcopy(quantize)
  return config


def from_config(model: nn.Module, quantize: Any) -> nn.Module:
  """`model`, PTQ-quantized when `quantize` (config.model.quantize) names a mode."""
  if not quantize or not quantize.get("mode"):
    return model
  return ptq_model(model, quantize["mode"], bool(quantize.get("static", False)))
