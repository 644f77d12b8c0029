"""Hugging Face tensor names <-> mmjax param paths, both ways, with strict checks.

A `Rule(mm, hf, how)` ties one mmjax param ("text_tower/encoder/block_0/attn/
query/kernel") to one HF tensor, and `how` says how its layout differs:

  same     identical layout
  T        torch Linear weight [O, I] <-> Dense kernel [I, O]
  conv     torch Conv2d weight [O, C, kh, kw] <-> flax Conv kernel [kh, kw, C, O]
  lead<k>  the mmjax array has k extra leading axes of size 1 (CLIP's class embedding)
  split<i>/<n>  the i-th of n equal slices of the HF tensor's last axis (GPT-2's c_attn)
  zero     no HF tensor; the mmjax param must be 0 (CLIP has no logit bias)
  count    no mmjax param; torch BatchNorm's num_batches_tracked, unused on import and
           exported as 0 (a momentum BatchNorm never reads it)

BatchNorm's running statistics are not params: rules name them "batch_stats/<module
path>/mean" (and /var), and the trees `import_params` takes and returns hold them
under a top-level "batch_stats" key.

The rules are built from the mmjax model config, so loading into a model of
another shape reports every missing, unexpected and mis-shaped tensor at once.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
from flax import traverse_util

from mmjax.models.registry import resnet_size
from mmjax.models.vit import resample_posemb
from mmjax.io import layers_layout
from mmjax.io.trees import CheckpointMismatch

# Buffers some checkpoints carry that are not parameters.
IGNORED = re.compile(r"(position_ids|token_type_ids|\.attn\.bias|\.attn\.masked_bias)$")
# Where an architecture keeps its encoder; the checkpoint may or may not use it.
PREFIX = {"ViTForImageClassification": "vit.", "BertForMaskedLM": "bert.",
          "GPT2LMHeadModel": "transformer.", "ResNetForImageClassification": "resnet."}


class Rule(NamedTuple):
  mm: str | None
  hf: str | None
  how: str = "same"


class KeyMismatch(CheckpointMismatch):
  """The checkpoint does not fit the model; lists every key at fault."""

  def __init__(self, source: str, missing, unexpected, misshaped):
    self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
    parts = [f"{len(v)} {k}:\n    " + "\n    ".join(v)
             for k, v in (("missing", missing), ("unexpected", unexpected),
                          ("mis-shaped", misshaped)) if v]
    super().__init__(f"{source} does not fit this model; " + "\n  ".join(parts))


def _dense(mm: str, hf: str, how: str = "T") -> list[Rule]:
  return [Rule(f"{mm}/kernel", f"{hf}.weight", how), Rule(f"{mm}/bias", f"{hf}.bias")]


def _norm(mm: str, hf: str) -> list[Rule]:
  return [Rule(f"{mm}/scale", f"{hf}.weight"), Rule(f"{mm}/bias", f"{hf}.bias")]


# mmjax block part -> HF sub-name, per family.
_BLOCK_NAMES = {
    "clip": dict(ln1="layer_norm1", query="self_attn.q_proj", key="self_attn.k_proj",
                 value="self_attn.v_proj", out="self_attn.out_proj", ln2="layer_norm2",
                 fc1="mlp.fc1", fc2="mlp.fc2"),
    "vit": dict(ln1="layernorm_before", query="attention.attention.query",
                key="attention.attention.key", value="attention.attention.value",
                out="attention.output.dense", ln2="layernorm_after", fc1="intermediate.dense",
                fc2="output.dense"),
    "bert": dict(ln1="attention.output.LayerNorm", query="attention.self.query",
                 key="attention.self.key", value="attention.self.value",
                 out="attention.output.dense", ln2="output.LayerNorm", fc1="intermediate.dense",
                 fc2="output.dense"),
}


def _blocks(mm: str, hf: str, depth: int, family: str) -> list[Rule]:
  rules = []
  for i in range(depth):
    b, h = f"{mm}/encoder/block_{i}", f"{hf}{i}."
    if family == "gpt2":   # Conv1D weights are already [I, O]; q, k, v share c_attn
      rules += [Rule(f"{b}/attn/{part}/{leaf}", f"{h}attn.c_attn.{hl}", f"split{j}/3")
                for j, part in enumerate(("query", "key", "value"))
                for leaf, hl in (("kernel", "weight"), ("bias", "bias"))]
      rules += _dense(f"{b}/attn/out", f"{h}attn.c_proj", "same")
      rules += _norm(f"{b}/ln1", f"{h}ln_1") + _norm(f"{b}/ln2", f"{h}ln_2")
      rules += _dense(f"{b}/mlp/fc1", f"{h}mlp.c_fc", "same")
      rules += _dense(f"{b}/mlp/fc2", f"{h}mlp.c_proj", "same")
      continue
    n = _BLOCK_NAMES[family]
    for part in ("query", "key", "value", "out"):
      rules += _dense(f"{b}/attn/{part}", h + n[part])
    rules += _norm(f"{b}/ln1", h + n["ln1"]) + _norm(f"{b}/ln2", h + n["ln2"])
    rules += _dense(f"{b}/mlp/fc1", h + n["fc1"]) + _dense(f"{b}/mlp/fc2", h + n["fc2"])
  return rules


def _conv_norm(mm: str, hf: str) -> list[Rule]:
  """A ResNet ConvNorm <-> HF's ResNetConvLayer / ResNetShortCut (conv + BatchNorm)."""
  n = f"{hf}.normalization"
  return [Rule(f"{mm}/conv/kernel", f"{hf}.convolution.weight", "conv"),
          *_norm(f"{mm}/norm", n),
          Rule(f"batch_stats/{mm}/norm/mean", f"{n}.running_mean"),
          Rule(f"batch_stats/{mm}/norm/var", f"{n}.running_var"),
          Rule(None, f"{n}.num_batches_tracked", "count")]


def _resnet(p: str, image) -> list[Rule]:
  """HF ResNet: stage s's block j is mmjax's stage_s/block_<blocks before it + j>."""
  size = resnet_size(image)
  i = "image_tower"
  r = _conv_norm(f"{i}/stem", f"{p}embedder.embedder")
  first = 0
  for s, depth in enumerate(size["depths"]):
    for j in range(depth):
      mm, h = f"{i}/stage_{s}/block_{first + j}", f"{p}encoder.stages.{s}.layers.{j}"
      for k in range(3 if size["bottleneck"] else 2):
        r += _conv_norm(f"{mm}/conv{k + 1}", f"{h}.layer.{k}")
      # A shortcut conv where the shape changes: every stage's first block but the
      # first stage's, unless that one also changes the stem's width (bottlenecks).
      if j == 0 and (s > 0 or size["widths"][0] != size["stem_width"]):
        r += _conv_norm(f"{mm}/shortcut", f"{h}.shortcut")
    first += depth
  if image.get("num_classes"):
    r += _dense(f"{i}/head", "classifier.1")
  return r


def rules(arch: str, model, prefix: str | None = None) -> tuple[list[Rule], dict[str, str]]:
  """(rules, tied) for `arch` and an mmjax `config.model`. `tied` maps HF tensors that
  transformers ties to another (and may or may not save) to that other tensor."""
  p = PREFIX.get(arch, "") if prefix is None else prefix
  if arch == "CLIPModel":
    v, t, i, x = "vision_model.", "text_model.", "image_tower", "text_tower"
    # One tower of a CLIP (an image or a text classifier started from it) takes that
    # tower's rules only; its config's init.ignore names the other side's tensors.
    r = []
    if model.get("image"):
      r += [Rule(f"{i}/patch_embed/kernel", f"{v}embeddings.patch_embedding.weight", "conv"),
            Rule(f"{i}/cls", f"{v}embeddings.class_embedding", "lead2"),
            Rule(f"{i}/posemb", f"{v}embeddings.position_embedding.weight", "lead1"),
            *_norm(f"{i}/ln_pre", f"{v}pre_layrnorm"),
            *_blocks(i, f"{v}encoder.layers.", model.image.depth, "clip"),
            *_norm(f"{i}/ln_post", f"{v}post_layernorm")]
    if model.get("text"):
      r += [Rule(f"{x}/token_embed/embedding", f"{t}embeddings.token_embedding.weight"),
            Rule(f"{x}/posemb", f"{t}embeddings.position_embedding.weight", "lead1"),
            *_blocks(x, f"{t}encoder.layers.", model.text.depth, "clip"),
            *_norm(f"{x}/encoder/ln_final", f"{t}final_layer_norm")]
    if model.get("embed_dim"):
      r += [Rule("image_proj/kernel", "visual_projection.weight", "T"),
            Rule("text_proj/kernel", "text_projection.weight", "T"),
            Rule("logit_scale", "logit_scale"), Rule("logit_bias", None, "zero")]
    return r, {}
  if arch.startswith("ViT"):
    i, c = "image_tower", model.image
    r = [*_dense(f"{i}/patch_embed", f"{p}embeddings.patch_embeddings.projection", "conv"),
         Rule(f"{i}/cls", f"{p}embeddings.cls_token"),
         Rule(f"{i}/posemb", f"{p}embeddings.position_embeddings"),
         *_blocks(i, f"{p}encoder.layer.", c.depth, "vit"),
         *_norm(f"{i}/encoder/ln_final", f"{p}layernorm")]
    if c.get("pooler"):
      r += _dense(f"{i}/pooler", f"{p}pooler.dense")
    if c.get("num_classes"):
      r += _dense(f"{i}/head", "classifier")
    return r, {}
  if arch.startswith("ResNet"):
    return _resnet(p, model.image), {}
  x, c = "text_tower", model.text
  if arch.startswith("Bert"):
    e = f"{p}embeddings."
    r = [Rule(f"{x}/token_embed/embedding", f"{e}word_embeddings.weight"),
         Rule(f"{x}/posemb", f"{e}position_embeddings.weight", "lead1"),
         Rule(f"{x}/type_embed/embedding", f"{e}token_type_embeddings.weight"),
         *_norm(f"{x}/ln_embed", f"{e}LayerNorm"),
         *_blocks(x, f"{p}encoder.layer.", c.depth, "bert")]
    if c.get("pooler"):
      r += _dense(f"{x}/pooler", f"{p}pooler.dense")
    tied = {}
    if c.get("head") == "mlm":
      r += [*_dense(f"{x}/mlm_head/transform", "cls.predictions.transform.dense"),
            *_norm(f"{x}/mlm_head/ln", "cls.predictions.transform.LayerNorm"),
            Rule(f"{x}/mlm_head/bias", "cls.predictions.bias")]
      tied = {"cls.predictions.decoder.weight": f"{e}word_embeddings.weight",
              "cls.predictions.decoder.bias": "cls.predictions.bias"}
    return r, tied
  if arch == "GPT2LMHeadModel":
    r = [Rule(f"{x}/token_embed/embedding", f"{p}wte.weight"),
         Rule(f"{x}/posemb", f"{p}wpe.weight", "lead1"),
         *_blocks(x, f"{p}h.", c.depth, "gpt2"),
         *_norm(f"{x}/encoder/ln_final", f"{p}ln_f")]
    return r, {"lm_head.weight": f"{p}wte.weight"}
  raise ValueError(f"no key mapping for {arch!r}")


def detect_prefix(arch: str, keys) -> str:
  """The encoder prefix this checkpoint uses ("bert." for BertForMaskedLM files, "" for
  BertModel files; either may be loaded as either)."""
  probe = {"Bert": "embeddings.word_embeddings.weight", "ViT": "embeddings.cls_token",
           "GPT2": "wte.weight", "ResNet": "embedder.embedder.convolution.weight"}
  family = next((f for f in probe if arch.startswith(f)), None)
  if family is None:
    return ""
  prefixes = {"Bert": "bert.", "ViT": "vit.", "GPT2": "transformer.", "ResNet": "resnet."}
  for p in (PREFIX.get(arch, ""), prefixes[family], ""):
    if p + probe[family] in keys:
      return p
  return PREFIX.get(arch, "")


def _to_mm(x: np.ndarray, how: str) -> np.ndarray:
  if how == "T":
    return x.T
  if how == "conv":
    return x.transpose(2, 3, 1, 0)
  if how.startswith("lead"):
    return x.reshape((1,) * int(how[4:]) + x.shape)
  if how.startswith("split"):
    i, n = map(int, how[5:].split("/"))
    return np.split(x, n, axis=-1)[i]
  return x


def _to_hf(y: np.ndarray, how: str) -> np.ndarray:
  if how == "T":
    return y.T
  if how == "conv":
    return y.transpose(3, 2, 0, 1)
  if how.startswith("lead"):
    return y.reshape(y.shape[int(how[4:]):])
  return y


def _resample_grid(posemb: np.ndarray, n_cls: int, grid: int) -> np.ndarray:
  """[1, n_cls + g*g, D] -> [1, n_cls + grid*grid, D], bilinear on the patch grid."""
  patches = np.asarray(resample_posemb(posemb[:, n_cls:], (grid, grid)))
  return np.concatenate([posemb[:, :n_cls], patches], axis=1)


def import_params(tensors: dict[str, np.ndarray], arch: str, config, expected,
                  init=None, allow_missing: str = "", ignore: str = "",
                  source: str = "checkpoint") -> dict:
  """HF `tensors` -> mmjax params (nested dict of float32 numpy) for `config`.

  expected: the model's params (arrays or ShapeDtypeStructs), nested like the result
    (BatchNorm statistics under "batch_stats", see the module doc).
  allow_missing: regex on mmjax param paths that may be absent from the checkpoint
    (a new task head); those take their value from `init`.
  ignore: regex on HF tensor names to leave unused (a head this model does not have).
  An image tower's position embedding whose grid differs is resampled (bilinear).
  A scanned model's (model.scan_layers) params come back stacked like `expected`.
  """
  scanned = bool(layers_layout.is_scanned(expected))
  if scanned:    # the rules name unrolled blocks: match them unrolled, stack at the end
    expected = layers_layout.to_layout(expected, False)
    init = None if init is None else layers_layout.to_layout(init, False)
  want = traverse_util.flatten_dict(expected, sep="/")
  rule_list, tied = rules(arch, config.model, detect_prefix(arch, tensors))
  allowed = re.compile(allow_missing) if allow_missing else None
  skip = re.compile(ignore) if ignore else None
  out, used, missing, misshaped = {}, set(), [], []
  reported = set()      # mmjax paths whose HF tensor is already listed as missing/mis-shaped
  for r in rule_list:
    if r.how == "count":
      used.add(r.hf)
      continue
    if r.mm not in want:
      missing.append(f"{r.mm} (the model has no such param for {r.hf})")
      continue
    if r.how == "zero":
      out[r.mm] = np.zeros(want[r.mm].shape, np.float32)
      continue
    if r.hf not in tensors:
      if not (allowed and allowed.search(r.mm)):
        missing.append(r.hf)
        reported.add(r.mm)
      continue
    used.add(r.hf)
    value = _to_mm(np.asarray(tensors[r.hf]), r.how)
    shape = tuple(want[r.mm].shape)
    if value.shape != shape and r.mm == "image_tower/posemb" and value.shape[2] == shape[2]:
      image = config.model.image
      n_cls = int(image.get("posemb_cls", False))
      value = _resample_grid(value, n_cls, config.data.image_size // image.patch)
    if value.shape != shape:
      misshaped.append(f"{r.hf} {tuple(tensors[r.hf].shape)} -> {r.mm} expects {shape}")
      reported.add(r.mm)
      continue
    out[r.mm] = value.astype(np.float32)
  for hf_key, source_key in tied.items():
    if hf_key in tensors:
      used.add(hf_key)
      if source_key in tensors and not np.array_equal(tensors[hf_key], tensors[source_key]):
        misshaped.append(f"{hf_key} differs from {source_key}; mmjax ties them (untied "
                         f"weights are not supported)")
  init_flat = traverse_util.flatten_dict(init, sep="/") if init is not None else {}
  for path in sorted(set(want) - set(out)):
    if allowed and allowed.search(path) and path in init_flat:
      out[path] = np.asarray(init_flat[path])
    elif path not in reported:
      missing.append(f"{path} (mmjax param with no tensor in the checkpoint)")
  unexpected = sorted(k for k in tensors if k not in used and not IGNORED.search(k)
                      and not (skip and skip.search(k)))
  if missing or unexpected or misshaped:
    raise KeyMismatch(source, missing, unexpected, misshaped)
  return layers_layout.to_layout(traverse_util.unflatten_dict(out, sep="/"), scanned)


def export_params(params, arch: str, config) -> dict[str, np.ndarray]:
  """mmjax params (+ "batch_stats", see the module doc) -> HF tensors (float32, but
  num_batches_tracked's int64; contiguous), the keys transformers saves. Scanned params
  (model.scan_layers) are unstacked first."""
  flat = {k: np.asarray(v, np.float32) for k, v in
          traverse_util.flatten_dict(layers_layout.to_layout(params, False), sep="/").items()}
  rule_list, _ = rules(arch, config.model)
  out, parts = {}, {}
  for r in rule_list:
    if r.how == "count":
      out[r.hf] = np.zeros((), np.int64)
      continue
    if r.mm not in flat:
      raise KeyError(f"the params have no {r.mm}, which {arch} needs for {r.hf}")
    if r.how == "zero":
      if np.any(flat[r.mm] != 0):
        raise ValueError(f"{r.mm}={flat[r.mm]} is not 0 and {arch} has no place for it")
    elif r.how.startswith("split"):
      parts.setdefault(r.hf, []).append(flat[r.mm])
    else:
      out[r.hf] = _to_hf(flat[r.mm], r.how)
  for key, pieces in parts.items():
    out[key] = np.concatenate(pieces, axis=-1)
  unused = sorted(set(flat) - {r.mm for r in rule_list})
  if unused:
    raise ValueError(f"{arch} has no place for the mmjax params {unused}")
  # np.array, not ascontiguousarray, which would turn the 0-d logit_scale into shape [1].
  return {k: np.array(v, order="C") for k, v in out.items()}
