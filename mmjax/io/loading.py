"""`load(path)`: one way in for every reader of trained weights.

  loaded = mmjax.io.load("runs/a")            # an mmjax workdir (latest step)
  loaded = mmjax.io.load("hf/clip-vit-b32")   # a local Hugging Face directory
  model = loaded.model()
  emb, _ = model.apply(loaded.variables, loaded.preprocess.batch(images),
                       method="encode_image")

Fine-tune inits, `init.towers`, distillation teachers, `mmjax eval`, `mmjax
convert` (and export and serving) all come through here, so "is this a workdir or
an HF directory?" is decided in one place (`kind_of`).
"""
from __future__ import annotations

import dataclasses
import pathlib
import re

import ml_collections
import numpy as np
import tokenizers
from etils import epath
from PIL import Image

from mmjax.data.tokenizer import Tokenizer, from_hf, get_tokenizer, load_tokenizer
from mmjax.io import hf, layers_layout, storage, workdir
from mmjax.io.checkpointer import Checkpointer
from mmjax.io.preprocess import ImagePreprocess
from mmjax.io.trees import CheckpointMismatch, flat, unflat
from mmjax.models import build_model, variables


@dataclasses.dataclass
class Loaded:
  """What `load` returns: enough to build, run and re-save the model."""
  path: pathlib.Path | epath.Path      # a local folder, or a URL (gs://...) as epath
  kind: str                            # "workdir" | "hf"
  config: ml_collections.ConfigDict    # run config (workdir) or {"model", "data"} (hf)
  params: dict | None                  # None with load(..., params=False)
  step: int | None                     # checkpoint step (None: an HF directory)
  tokenizer: Tokenizer | None
  preprocess: ImagePreprocess | None   # image -> model input, as the model was trained
  hf_config: dict | None = None        # the HF config.json (HF dirs, converted workdirs)
  batch_stats: dict = dataclasses.field(default_factory=dict)   # BatchNorm's; {} if none
  # Class names by label field, in id order: a workdir's label_names.json; an HF
  # classifier's id2label as {"label": [...]}; {} when unknown.
  label_names: dict = dataclasses.field(default_factory=dict)

  @property
  def variables(self) -> dict:
    """What `model.apply` takes: the params (+ batch_stats)."""
    return variables(self.params, self.batch_stats)

  def model(self):
    """The Flax module of `config`; a workdir's is sized by its tokenizer where the config
    leaves it (an HF config states its vocabulary itself)."""
    if self.kind == "hf":
      return build_model(self.config)
    return build_model(self.config, *_vocab(self.tokenizer))


def special_ids(tokenizer) -> dict[str, int]:
  return {"pad": tokenizer.pad_id, "cls": tokenizer.cls_id, "sep": tokenizer.sep_id,
          "mask": tokenizer.mask_id}


def _vocab(tokenizer) -> tuple[int | None, dict | None]:
  if tokenizer is None:
    return None, None
  return tokenizer.vocab_size, special_ids(tokenizer)


def kind_of(path, what: str = "path") -> str:
  """"workdir" or "hf"; anything else is an error naming `what` (e.g. "init.path")."""
  if storage.is_remote(path):
    if workdir.is_workdir(path):
      return "workdir"
    raise FileNotFoundError(f"{what}={str(path)!r} is not an mmjax workdir (config.json + "
                            f"checkpoints/); Hugging Face directories are read from local "
                            f"paths only")
  path = pathlib.Path(path).expanduser()
  if workdir.is_workdir(path):
    return "workdir"
  if hf.is_hf_dir(path):
    return "hf"
  if not path.exists():
    raise FileNotFoundError(f"{what}={str(path)!r} does not exist")
  raise FileNotFoundError(f"{what}={str(path)!r} is neither an mmjax workdir (config.json + "
                          f"checkpoints/) nor a Hugging Face directory (model.safetensors)")


def data_preprocess(data) -> ImagePreprocess:
  """The eval-time image transform of mmjax's data pipeline (square bilinear resize, then
  (x / 255 - mean) / std), as an ImagePreprocess for single images."""
  s = int(data.image_size)
  return ImagePreprocess(resize=(s, s), crop=None, resample=Image.Resampling.BILINEAR,
                         rescale=1 / 255, mean=tuple(data.get("mean", (0.5,) * 3)),
                         std=tuple(data.get("std", (0.5,) * 3)))


def tokenizer_path(path: pathlib.Path, config) -> str:
  """Where the tokenizer of a workdir or HF directory is ("" when it has none on disk):
  the tokenizer.json beside the weights (every mmjax run saves one), else a workdir's
  data.tokenizer."""
  if (path / "tokenizer.json").is_file():
    return str(path / "tokenizer.json")
  if (path / "vocab.txt").is_file() or (path / "merges.txt").is_file():   # BERT's, GPT-2's
    return str(path)
  return str(config.data.get("tokenizer", "")) if "data" in config else ""


def workdir_tokenizer(path: pathlib.Path, config) -> Tokenizer | None:
  """The tokenizer a workdir's run used; for a workdir older than saved tokenizers, the
  one trained from the run's data (cached) if its model reads text, else None."""
  if storage.is_remote(path):
    remote = path / "tokenizer.json"
    if remote.is_file():
      return from_hf(tokenizers.Tokenizer.from_str(remote.read_text()), str(remote))
  where = tokenizer_path(path, config)
  if where:
    return load_tokenizer(where)
  return get_tokenizer(config.data) if config.model.get("text") else None


def load(path, step: int | None = None, *, config: ml_collections.ConfigDict | None = None,
         new: str = "", ignore: str = "", params: bool = True, what: str = "path") -> Loaded:
  """An mmjax workdir (checkpoint `step`, default the newest readable) or a local Hugging
  Face directory.

  config: for an HF directory, the mmjax model to import the weights into (default: the
    one the directory describes); `new` (regex of mmjax params left at a fresh init) and
    `ignore` (regex of HF tensors to leave unused) relax the strict key check. A workdir's
    params come back as saved, less those matching `ignore`, and with `config`, in the
    stack layout of its model (model.scan_layers, mmjax/io/layers_layout.py).
  params: False reads configs, tokenizer and preprocessing only.
  """
  storage.check(path, what)
  path = storage.resolve(path)
  kind = kind_of(path, what)
  if kind == "hf":
    return _load_hf(path, config, new, ignore, params)
  run_config = workdir.run_config_of(path)
  weights, stats, got_step = None, {}, step
  if params:
    ckpt = Checkpointer(path, keep=1, read_only=True, base_loader=base_params)
    try:
      weights, stats, got_step = ckpt.read_variables(step)
    finally:
      ckpt.close()
    if ignore:
      skip = re.compile(ignore)
      weights = unflat({k: v for k, v in flat(weights).items() if not skip.search(k)})
    if config is not None:    # into another run's model: in its stack layout
      weights = layers_layout.for_config(weights, config)
  preprocess = data_preprocess(run_config.data) if run_config.model.get("image") else None
  return Loaded(path, kind, run_config, weights, got_step, workdir_tokenizer(path, run_config),
                preprocess, workdir.hf_config_of(path), stats, workdir.label_names_of(path))


def _load_hf(path: pathlib.Path, config, new: str, ignore: str, params: bool) -> Loaded:
  if params and config is None:   # the directory's own model: all of from_pretrained's checks
    p = hf.from_pretrained(path, ignore=ignore)
    return Loaded(path, "hf", p.config, p.params, None, p.tokenizer, p.preprocess, p.hf_config,
                  p.batch_stats, hf_label_names(p.hf_config))
  model_config, preprocess = hf.pretrained_config(path)
  weights, stats = None, {}
  if params:
    # Into another model (a fine-tune's): the importer checks keys and shapes itself;
    # params matching `new` come back freshly initialised and are dropped, so the caller's
    # own init is used.
    fresh = re.compile(new) if new else None
    imported, stats = hf.load_variables(path, config, allow_missing=new, ignore=ignore)
    weights = unflat({k: v for k, v in flat(imported).items()
                      if not (fresh and fresh.search(k))})
  hf_config = hf.read_config(path)
  return Loaded(path, "hf", model_config, weights, None, hf.hf_tokenizer(path), preprocess,
                hf_config, stats, hf_label_names(hf_config))


def hf_label_names(hf_config: dict | None) -> dict[str, list[str]]:
  """{"label": names} from an HF classifier's config.json id2label ({} without one)."""
  id2label = (hf_config or {}).get("id2label") or {}
  if not id2label or not (hf_config.get("architectures") or [""])[0].endswith(
      "ForImageClassification"):
    return {}
  return {"label": [str(id2label.get(str(i), id2label.get(i, i)))
                    for i in range(len(id2label))]}


def base_params(base: dict, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The params a delta checkpoint left out (`base["params"]`), read back from the
  checkpoint it points to (`base["path"]` at `base["step"]`); `config` is the delta
  run's config (its model is what an HF base is imported into)."""
  init = config.get("init") or {}
  got = load(base["path"], base.get("step"), config=config, new=init.get("new", ""),
             ignore=init.get("ignore", ""), what="the base checkpoint of a fine-tune")
  saved = {k: np.asarray(v) for k, v in flat(got.params).items()}
  missing = sorted(set(base["params"]) - set(saved))
  if missing:
    raise CheckpointMismatch(f"base checkpoint {base['path']} (step {base.get('step')}) no "
                             f"longer has {len(missing)} params this fine-tune's checkpoint "
                             f"relies on, e.g. {missing[:5]}")
  return {k: saved[k] for k in base["params"]}
