"""`mmjax export`: a trained model as files that run without mmjax's model code.

  mmjax export --workdir W --out DIR [--what image,text,zeroshot,classify,caption]
               [--format stablehlo|onnx] [--step N]

stablehlo (default): per function, `<name>.jaxexport`, a serialized `jax.export.Exported`
with a symbolic batch dimension "b" (and "n", the number of label prompts, for zeroshot),
lowered for CPU, CUDA and TPU in one artifact where the lowering allows (else CPU alone,
said in the manifest). `mmjax.deploy.exported.load_exported(DIR)` runs them. "caption"
(a captioner: a causal text tower with an LM head reading the image by cross-attention or
as its prefix) is greedy decoding, prefill and a `lax.while_loop` of KV-cache steps,
inside the one artifact.

The weights are the functions' first input, not constants inside them: the towers are
shared (image, zeroshot and classify read the same image tower), so one `variables.npz`
holds them once instead of once per function, the StableHLO stays small and readable, and
a quantized checkpoint's int8 weights keep their dtype on disk. An artifact is
`f(variables, *inputs)`; the loader binds the variables.

onnx: `image.onnx` and `text.onnx`, the encoders converted by jax2onnx with a symbolic
batch "B" and the weights as ONNX initializers (an ONNX model is one self-contained file).

Both formats write manifest.json (functions with input and output names, shapes and
dtypes; mmjax version, config hash, platforms), preprocess.json (the image transform) and
the tokenizer.json the text functions need.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import io
# decode()'s own checks read the prompts' values; an exported caption's are traced (and
# well-formed by construction), so it calls the jitted core under them.
from mmjax.generate.decode import Settings as DecodeSettings
from mmjax.generate.decode import decode_jit as decode_core
from mmjax.io.trees import flat

FUNCTIONS = ("image", "text", "zeroshot", "classify", "caption")
FORMATS = ("stablehlo", "onnx")
ONNX_FUNCTIONS = ("image", "text")
PLATFORMS = ("cpu", "cuda", "tpu")
ONNX_OPSET = 23                  # jax2onnx 0.17's default (onnxruntime 1.32 runs it)
MANIFEST = "manifest.json"
VARIABLES = "variables.npz"
FORMAT_VERSION = 1
CAPTION_TOKENS = 32              # new tokens at most (fewer where the context ends first)

log = logging.getLogger(__name__)


class ExportError(ValueError):
  """A workdir, --out or --what that cannot be exported; the message says which."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """One input or output: shape entries are ints or symbolic dimension names."""
  name: str
  shape: tuple[int | str, ...]
  dtype: str

  def to_json(self) -> dict:
    return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclasses.dataclass(frozen=True)
class Function:
  """`fn(variables, *inputs)`: one exported entry point."""
  fn: Callable
  inputs: tuple[Spec, ...]
  outputs: tuple[str, ...]
  doc: str


def _inputs(config) -> dict[str, tuple[Spec, ...]]:
  s, length = int(config.data.image_size), int(config.data.max_len)
  return {"image": (Spec("image", ("b", s, s, 3), "float32"),),
          "text": (Spec("text", ("b", length), "int32"), Spec("text_mask", ("b", length), "int32"))}


def functions(model, config, tokenizer=None) -> dict[str, Function]:
  """What `model` can export, by name ("caption" needs the `tokenizer`'s BOS and EOS)."""
  spec = _inputs(config)
  image, text = model.image_tower is not None, model.text_tower is not None
  apply = lambda method: (lambda v, *xs: model.apply(v, *xs, method=method))
  out = {}
  if image:
    emb = "image_emb" if model.embed_dim else "pooled"
    out["image"] = Function(apply(lambda m, x: _embedding(m.encode_image(x))), spec["image"],
                            (emb,), f"images -> {emb} [b, D]")
  if text:
    emb = "text_emb" if model.embed_dim else "pooled"
    out["text"] = Function(apply(lambda m, ids, mask: _embedding(m.encode_text(ids, mask))),
                           spec["text"], (emb,), f"token ids, mask -> {emb} [b, D]")
  if image and text and model.embed_dim:
    prompts = tuple(dataclasses.replace(x, shape=("n", *x.shape[1:])) for x in spec["text"])
    out["zeroshot"] = Function(apply(_zeroshot_logits), spec["image"] + prompts, ("logits",),
                               "images [b], prompts [n] -> logit_scale * cosine [b, n]")
  if model.num_classes and model.classify_input != "text_tokens":
    reads = {"image": spec["image"], "text": spec["text"],
             "fusion": spec["image"] + spec["text"]}[model.classify_input]
    names = [x.name for x in reads]
    out["classify"] = Function(
        apply(lambda m, *xs: m.classify(dict(zip(names, xs)))), reads, ("class_logits",),
        "the classifier's inputs -> class logits [b, C]")
  if has_decoder(model) and tokenizer is not None:
    out["caption"] = _caption(model, spec["image"], tokenizer)
  return out


def _caption(model, images: tuple[Spec, ...], tokenizer) -> Function:
  """Greedy captions: the decoder from BOS alone, `caption_tokens` new tokens at most."""
  n = caption_tokens(model)
  settings = DecodeSettings("greedy", n, tokenizer.eos_id, tokenizer.pad_id)

  def caption(v, x):
    bos = jnp.full((x.shape[0], 1), tokenizer.bos_id, jnp.int32)          # [b, 1]
    got = decode_core(model, settings, v, bos, jnp.ones_like(bos), jax.random.key(0), x)
    return got.tokens[:, 0]                                                # [b, n]

  return Function(caption, images, ("tokens",),
                  f"images -> greedy caption token ids [b, {n}], EOS then padding after it")


def caption_tokens(model) -> int:
  return min(CAPTION_TOKENS, model.text_tower.max_len - 1)


def _embedding(encoded):
  emb, tower = encoded
  return emb if emb is not None else tower["pooled"]


def _zeroshot_logits(m, images, ids, mask):
  image_emb, _ = m.encode_image(images)
  text_emb, _ = m.encode_text(ids, mask)
  scale = jnp.exp(jnp.minimum(m.logit_scale, jnp.log(100.0)))
  return scale * image_emb @ text_emb.T                      # [b, n]


def has_decoder(model) -> bool:
  """A causal text tower with an LM head that reads the image (a captioner): by
  cross-attention or as its image prefix."""
  tower = getattr(model, "text_tower", None)
  return (model.image_tower is not None and getattr(tower, "causal", False) and
          getattr(tower, "head", "") == "lm" and getattr(tower, "reads_images", False))


def select(available: dict[str, Function], model, what: str | None, fmt: str) -> list[str]:
  """The functions --what names (default: all the model has, of those `fmt` writes)."""
  allowed = FUNCTIONS if fmt == "stablehlo" else ONNX_FUNCTIONS
  if what is None:
    return [n for n in allowed if n in available]
  names = [n.strip() for n in what.split(",") if n.strip()]
  if not names:
    raise ExportError("--what is empty; give some of " + ",".join(allowed))
  for n in names:
    if n not in FUNCTIONS:
      raise ExportError(f"--what {n!r}: unknown function; expected some of {','.join(FUNCTIONS)}")
    if n not in allowed:
      raise ExportError(f"--what {n!r}: --format {fmt} writes {' and '.join(allowed)} only")
    if n == "caption" and not has_decoder(model):
      raise ExportError("--what caption: this model has no decoder")
    if n == "classify" and "classify" not in available:
      raise ExportError("--what classify: this model has no classifier "
                        "(config.model.classifier.num_classes is 0, or it tags tokens)")
    if n not in available:
      raise ExportError(f"--what {n!r}: this model has no " + {
          "image": "image tower", "text": "text tower",
          "zeroshot": "joint image-text embedding (image and text towers and embed_dim)"}[n])
  return list(dict.fromkeys(names))


def _check_out(out: pathlib.Path) -> None:
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ExportError(f"--out {out} exists and is not an empty directory; nothing was "
                      f"written (choose a new directory)")


def _symbolic(specs: tuple[Spec, ...]) -> list[jax.ShapeDtypeStruct]:
  dims = dict(zip(("b", "n"), jax.export.symbolic_shape("b, n")))
  return [jax.ShapeDtypeStruct(tuple(dims.get(d, d) for d in x.shape), jnp.dtype(x.dtype))
          for x in specs]


def _out_specs(names: tuple[str, ...], avals) -> list[dict]:
  return [Spec(n, tuple(d if isinstance(d, int) else str(d) for d in a.shape),
               str(a.dtype)).to_json() for n, a in zip(names, avals)]


def export_stablehlo(fn: Function, variables) -> tuple[bytearray, list, tuple[str, ...], str]:
  """(serialized artifact, output avals, platforms, note): CPU+CUDA+TPU when all lower."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
  args = (abstract, *_symbolic(fn.inputs))
  try:
    exp = jax.export.export(jax.jit(fn.fn), platforms=PLATFORMS)(*args)
    note = ""
  except Exception as e:  # pylint: disable=broad-except
    # Any platform's lowering may refuse (a primitive without a rule there): keep CPU.
    note = f"lowering for {','.join(PLATFORMS)} failed ({type(e).__name__}: {e}); cpu only"
    exp = jax.export.export(jax.jit(fn.fn), platforms=("cpu",))(*args)
  return exp.serialize(), exp.out_avals, tuple(exp.platforms), note.splitlines()[0] if note else ""


def export_onnx(fn: Function, variables, path: pathlib.Path) -> list[dict]:
  """`fn` with the weights as constants, to an ONNX file; -> its output specs."""
  try:   # optional (the onnx extra), so imported only when asked for
    import jax2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError(f"--format onnx needs jax2onnx ({e}); see README.md, Export") from None
  # jax2onnx imports every plugin it ships; those for equinox and dm_pix models log a
  # traceback each when those packages are absent, and mmjax's models need none of them.
  for noisy in ("jax2onnx.plugins.plugin_system", "onnx_ir.serde"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  specs = [jax.ShapeDtypeStruct(tuple("B" if d == "b" else d for d in x.shape), x.dtype)
           for x in fn.inputs]
  bound = lambda *xs: fn.fn(variables, *xs)
  jax2onnx.to_onnx(bound, specs, model_name=path.stem, opset=ONNX_OPSET, return_mode="file",
                   output_path=str(path), input_names=[x.name for x in fn.inputs],
                   output_names=list(fn.outputs))
  avals = jax.eval_shape(bound, *_symbolic(fn.inputs))
  return _out_specs(fn.outputs, [avals])


def config_hash(config) -> str:
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def preprocess_json(pre: io.ImagePreprocess | None) -> dict | None:
  if pre is None:
    return None
  return {"resize": list(pre.resize) if isinstance(pre.resize, tuple) else pre.resize,
          "crop": list(pre.crop) if pre.crop else None, "resample": int(pre.resample),
          "rescale": pre.rescale, "mean": list(pre.mean) if pre.mean else None,
          "std": list(pre.std) if pre.std else None}


def zeroshot_prompts(config) -> dict:
  """The templates and ensemble of the config's first zero-shot eval (else "{}", mean)."""
  for ev in (config.get("evals") or {}).values():
    if ev.get("type") == "zeroshot":
      return {"templates": list(ev.get("templates", ("{}",))),
              "ensemble": ev.get("ensemble", "mean")}
  return {"templates": ["{}"], "ensemble": "mean"}


def _class_names(loaded, num_classes: int) -> list[str]:
  names = loaded.label_names.get("label") or (
      next(iter(loaded.label_names.values())) if len(loaded.label_names) == 1 else None)
  if names and len(names) == num_classes:
    return [str(n) for n in names]
  return [str(i) for i in range(num_classes)]


def manifest(loaded, model, fmt: str) -> dict:
  """Everything about the model a server or user needs, without the functions."""
  config, tok = loaded.config, loaded.tokenizer
  pre = loaded.preprocess
  scale = 0.0
  if model.embed_dim:
    scale = float(np.exp(min(float(loaded.params["logit_scale"]), np.log(100.0))))
  return {
      "format": fmt, "format_version": FORMAT_VERSION,
      "mmjax_version": importlib.metadata.version("mmjax"), "jax_version": jax.__version__,
      "config_hash": config_hash(config), "source": str(loaded.path), "step": loaded.step,
      "embed_dim": int(model.embed_dim),
      "classify_input": model.classify_input if model.num_classes else "",
      "class_names": _class_names(loaded, model.num_classes),
      "has_decoder": has_decoder(model),
      "image_size": list(pre.output_size) if pre is not None and pre.output_size else None,
      "max_len": int(config.data.get("max_len", 0)),
      "logit_scale": scale,
      "zeroshot": zeroshot_prompts(config),
      "caption": {"max_tokens": caption_tokens(model), "eos_id": tok.eos_id}
                 if has_decoder(model) and tok is not None else None,
      "preprocess": "preprocess.json" if pre is not None else None,
      "tokenizer": None if tok is None else {
          "file": "tokenizer.json", "cls_id": tok.cls_id, "sep_id": tok.sep_id,
          "pad_id": tok.pad_id},
      "functions": {},
  }


def _export_model(loaded):
  """The model as exported: towers unsplit (in_slices needs a concrete batch; the maths
  is the same) and its variables as numpy."""
  model = loaded.model()
  if getattr(model, "tower_splits", 1) > 1:
    model = model.clone(tower_splits=1)
  variables = jax.tree.map(np.asarray, loaded.variables)
  return model, variables


def export(workdir, out, *, what: str | None = None, fmt: str = "stablehlo",
           step: int | None = None) -> dict:
  """Write the export of `workdir` (checkpoint `step`, default the newest) to `out`, which
  must not exist or be empty; it appears whole or not at all. -> the manifest."""
  out = pathlib.Path(out).expanduser().absolute()
  _check_out(out)
  if fmt not in FORMATS:
    raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
  io.storage.check(workdir, "--workdir")
  workdir = io.storage.resolve(workdir)
  if not (workdir / "checkpoints").is_dir():
    raise ExportError(f"--workdir {workdir}: no checkpoint in {workdir / 'checkpoints'} "
                      f"(train it first, or give a workdir that has one)")
  loaded = io.load(workdir, step, what="--workdir")
  if fmt == "onnx" and loaded.config.model.get("quantize"):
    # jax2onnx 0.17 patches flax.linen.Conv with a primitive whose shape rule re-runs the
    # convolution, which qwix intercepts and refuses as an unquantized param (the image
    # tower); the text tower's quantized Dense layers fail inside its tracing as well.
    raise ExportError(f"--workdir {workdir}: --format onnx cannot convert a qwix-quantized "
                      f"model (jax2onnx 0.17 does not trace qwix's layers); use --format "
                      f"stablehlo, or export the float workdir")
  model, variables = _export_model(loaded)
  available = functions(model, loaded.config, loaded.tokenizer)
  names = select(available, model, what, fmt)
  if not names:
    raise ExportError(f"--workdir {workdir}: the model has none of the functions --format "
                      f"{fmt} writes ({', '.join(ONNX_FUNCTIONS)})")
  meta = manifest(loaded, model, fmt)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  tmp.chmod(0o755)                       # mkdtemp's 0o700 would stay on the export
  try:
    platforms, notes = None, []
    for name in names:
      fn = available[name]
      entry = {"doc": fn.doc, "inputs": [x.to_json() for x in fn.inputs]}
      if fmt == "stablehlo":
        blob, avals, got, note = export_stablehlo(fn, variables)
        (tmp / f"{name}.jaxexport").write_bytes(blob)
        entry.update(file=f"{name}.jaxexport", outputs=_out_specs(fn.outputs, avals),
                     platforms=list(got))
        platforms = [p for p in (platforms or got) if p in got]
        notes += [f"{name}: {note}"] if note else []
      else:
        entry.update(file=f"{name}.onnx", outputs=export_onnx(fn, variables, tmp / f"{name}.onnx"))
        entry["inputs"] = [dict(x, shape=["B" if d == "b" else d for d in x["shape"]])
                           for x in entry["inputs"]]
      meta["functions"][name] = entry
      log.info("exported %s", name)
    if fmt == "stablehlo":
      meta["platforms"] = platforms
    else:
      meta["onnx_opset"] = ONNX_OPSET
    if notes:
      meta["platforms_note"] = "; ".join(notes)
    if fmt == "stablehlo":
      named = {k: np.asarray(v) for k, v in flat(variables).items()}
      np.savez(tmp / VARIABLES, **named)
      meta["variables"] = {"file": VARIABLES, "count": len(named),
                           "bytes": int(sum(v.nbytes for v in named.values()))}
    if loaded.preprocess is not None:
      (tmp / "preprocess.json").write_text(json.dumps(preprocess_json(loaded.preprocess),
                                                      indent=2) + "\n")
    if loaded.tokenizer is not None:
      loaded.tokenizer.save(tmp)
    (tmp / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")
    _check_out(out)                      # still free after the minutes this took
    if out.exists():
      out.rmdir()
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return meta


def add_arguments(p) -> None:
  """`mmjax export`'s flags on the argparse (sub)parser `p`."""
  p.add_argument("--workdir", required=True, help="a trained mmjax workdir")
  p.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory")
  p.add_argument("--what", default=None, metavar="NAMES",
                 help=f"comma-separated, of {','.join(FUNCTIONS)} (default: all the model "
                      f"has; onnx: {','.join(ONNX_FUNCTIONS)})")
  p.add_argument("--format", default="stablehlo", choices=FORMATS)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)   # no bar here


# What a user got wrong (workdir, --out, --what): one line, exit 2.
USER_ERRORS = (ExportError, io.CheckpointMismatch, io.UnreadableCheckpoint, FileNotFoundError)


def main(args) -> int:
  """`mmjax export`: prints the manifest's summary as one JSON line; 2 on a user error."""
  try:
    meta = export(args.workdir, args.out, what=args.what, fmt=args.format, step=args.step)
  except USER_ERRORS as e:
    if os.environ.get("MMJAX_TRACEBACK"):
      raise
    print(f"mmjax export: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"out": str(pathlib.Path(args.out).absolute()), "format": meta["format"],
                    "step": meta["step"], "functions": sorted(meta["functions"]),
                    "platforms": meta.get("platforms", ["onnx"])}))
  return 0
