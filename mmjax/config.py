"""Configs are Python: `configs/<name>.py` defines `get_config(arg=None)`.

`load_config("configs/demo.py:tiny", ["--config.optim.lr=1e-3"])` loads, applies
overrides and locks. A key that does not exist is an error naming the key and
the nearest valid one, raised before anything is computed.

Configs build on `base_config()` (run-level defaults), `tower(...)` and
`data_block(name, ...)` (every data field the pipeline reads, with its default), and
read their arg with `parse_arg`. Values are checked by `mmjax.config_checks.validate`.
"""
from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
  pass


def _flat_keys(cfg, prefix="") -> list[str]:
  keys = []
  for k, v in cfg.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys += _flat_keys(v, prefix + k + ".")
  return keys


def _unknown(key: str, cfg) -> ConfigError:
  near = difflib.get_close_matches(key, _flat_keys(cfg), n=1, cutoff=0.5)
  hint = f"; did you mean '{near[0]}'?" if near else ""
  return ConfigError(f"unknown config key '{key}'{hint}")


def _resolve(spec: str) -> tuple[pathlib.Path, str | None]:
  path, _, arg = spec.partition(":")
  p = pathlib.Path(path)
  if not p.suffix:
    p = CONFIG_DIR / f"{path}.py"
  if not p.exists():
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.py")) if CONFIG_DIR.exists() else []
    raise ConfigError(f"config file {p} does not exist (built-in configs: {names})")
  return p, (arg or None)


def _parse(raw: str, old: Any, name: str) -> Any:
  """`raw` as a value of `old`'s type; `name` ("--config.optim.lr") says where it came from."""
  if isinstance(old, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if old is None:
      return raw
    raise ConfigError(f"{name}={raw}: cannot parse as {type(old).__name__}") from None
  if isinstance(old, bool) and not isinstance(value, bool):
    raise ConfigError(f"{name}={raw}: expected True or False")
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  if isinstance(old, ml_collections.ConfigDict) and isinstance(value, dict):
    return ml_collections.ConfigDict(value)   # replaces the whole sub-config
  if old is not None and not isinstance(value, type(old)):
    raise ConfigError(f"{name}={raw}: expected {type(old).__name__}, got "
                      f"{type(value).__name__}")
  return value


def set_key(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Set a dotted key from its command-line string; the key must exist, except under
  `objective_options.<objective>.<option>`, whose options are the objective function's
  keyword arguments (config_checks.validate checks their names against them)."""
  node = cfg
  parts = key.split(".")
  if len(parts) == 3 and parts[0] == "objective_options" and "objective_options" in cfg:
    options = cfg.objective_options
    with options.unlocked():
      if parts[1] not in options:
        options[parts[1]] = ml_collections.ConfigDict()
      if parts[2] not in options[parts[1]]:
        options[parts[1]][parts[2]] = _parse(raw, None, f"--config.{key}")
        return
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise _unknown(key, cfg)
    if i < len(parts) - 1:
      node = node[part]
  with node.unlocked():
    node[parts[-1]] = _parse(raw, node[parts[-1]], f"--config.{key}")


def _switch_source(cfg: ml_collections.ConfigDict, name: str) -> None:
  """`config.data` for source `name`: its fields with their defaults, keeping the values
  of the fields every source reads (image_size, max_len, augment, ...), so that
  `--config.data.name=files --config.data.path=...` works on a digits config."""
  if name == cfg.data.get("name"):
    return
  old = cfg.data.to_dict()
  with cfg.unlocked():
    cfg.data = data_block(name, **{k: v for k, v in old.items()
                                   if k in DATA_FIELDS and k != "name"})


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Set each `--config.key=value`; `data.name` is applied first, as it decides which
  `data.*` fields exist."""
  parsed = []
  for item in overrides:
    if not item.startswith("--config."):
      raise ConfigError(f"override {item!r} must look like --config.key=value")
    key, eq, raw = item[len("--config."):].partition("=")
    if not eq:
      raise ConfigError(f"override {item!r} has no '=value'")
    parsed.append((key, raw))
  for key, raw in sorted(parsed, key=lambda kv: kv[0] != "data.name"):   # stable
    if key == "data.name" and isinstance(cfg.get("data"), ml_collections.ConfigDict):
      _switch_source(cfg, data_fields(raw)["name"])
    else:
      set_key(cfg, key, raw)


def with_defaults(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`cfg` with the keys the code reads that a config file may leave out, so that each
  can be overridden on every config: every field of its data source, `model.classifier`
  (off) and `objective_options`."""
  with cfg.unlocked():
    data = cfg.get("data")
    if isinstance(data, ml_collections.ConfigDict) and data.get("name", "") in SOURCE_FIELDS:
      cfg.data = ml_collections.ConfigDict({**data_fields(data.name), **data.to_dict()})
    model = cfg.get("model")
    if isinstance(model, ml_collections.ConfigDict) and "classifier" not in model:
      model.classifier = ml_collections.ConfigDict(dict(input="image", num_classes=0))
    if isinstance(model, ml_collections.ConfigDict) and "decoder" not in model:
      # The text tower as a generation decoder (mmjax/models/registry.py DECODER_DEFAULTS).
      model.decoder = ml_collections.ConfigDict(dict(cross_attention=False, prefix_lm=False,
                                                     tie_embed=True, image_prefix=False))
    if isinstance(model, ml_collections.ConfigDict):
      # Every tower's blocks as one nn.scan, and what backprop keeps of each block
      # (mmjax/models/layers.py Encoder, REMAT_POLICIES).
      for key, default in (("scan_layers", False), ("remat", "none")):
        if key not in model:
          model[key] = default
    if "objective_options" not in cfg:
      cfg.objective_options = ml_collections.ConfigDict()
  return cfg


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`spec` is a path to a config file or a built-in name, with optional ':arg'."""
  path, arg = _resolve(spec)
  module_spec = importlib.util.spec_from_file_location(f"mmjax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg=None)")
  cfg = with_defaults(module.get_config(arg) if arg is not None else module.get_config())
  apply_overrides(cfg, overrides)
  cfg.lock()
  return cfg


def parse_arg(arg: str | None, flags: Iterable[str] = (),
              defaults: Mapping[str, Any] | None = None, *, where: str = "config"
              ) -> tuple[set[str], dict[str, Any]]:
  """The `arg` of `file.py:arg` as comma-separated tokens: flags ("tiny") and
  key=value pairs typed like `defaults` ("rank=4" -> 4 when the default is an int).

  Returns (the flags given, `defaults` updated by the values given). An unknown
  token is a ConfigError naming it, the nearest known one and all of them.
  """
  flags, on, values, given = set(flags), set(), dict(defaults or {}), set()
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, eq, raw = token.partition("=")
    if not eq and key in flags:
      on.add(key)
    elif eq and key in values:
      if key in given:
        raise ConfigError(f"{where}: arg {key!r} given twice in {arg!r}")
      given.add(key)
      values[key] = _parse(raw, values[key], f"{where} arg {key}")
    else:
      near = difflib.get_close_matches(key, sorted(flags | set(values)), n=1, cutoff=0.5)
      hint = f" (did you mean {near[0]!r}?)" if near else ""
      known = f"flags {sorted(flags)}" + (f", key=value {sorted(values)}" if values else "")
      raise ConfigError(f"{where}: unknown arg {token!r}{hint}; known: {known}")
  return on, values


def tower(**fields) -> ml_collections.ConfigDict:
  """A tower's config: a named `variant` ("B/16", "mu") and/or explicit sizes
  (0 = from the variant)."""
  base = dict(variant="", width=0, depth=0, heads=0, mlp_dim=0, pool="cls", act="gelu")
  return ml_collections.ConfigDict({**base, **fields})


# `config.data` fields every source's pipeline reads (mmjax/data: pipeline, tokenizer,
# cache), with the values the code falls back to when a field is absent.
DATA_FIELDS = dict(
    name="",                  # a source of SOURCE_FIELDS
    image_size=32, max_len=16,          # pixels per side; text tokens per example, padded
    seed=0, num_workers=0,
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),     # of [0, 1] pixels, per RGB channel
    augment=dict(crop_scale=(1.0, 1.0), flip=False),   # train only; off as given
    tokenizer="",             # a Hugging Face tokenizer file or folder; "" = train WordPiece
    vocab_size=1000,          # of the trained WordPiece tokenizer
    cache_dir="",             # "" = $MMJAX_CACHE or ~/.cache/mmjax
    text_field="caption",     # the example field that becomes the text tokens
    prefix_field="",          # a field put before the text as a decoder's prefix ("question")
    token_labels="",          # a per-word tag field to align to tokens ("word_tags"); "" = none
    train_examples=0,         # > 0: a fixed seeded subset of the train split (a label budget)
)
# Each source's own fields, with the code's defaults.
SOURCE_FIELDS = {
    "shapes": dict(train_size=50_000, eval_size=2_000, num_objects=(1, 3)),
    "digits": {},
    "files": dict(path="", image_dir="", image_key="image", text_key="caption", label_key="",
                  on_bad="skip", test_fraction=0.0),
    "folder": dict(path="", label_key="label", test_fraction=0.2, on_bad="skip"),
    "tfds": dict(tfds_name="", data_dir="", image_key="image", text_key="", label_key="label",
                 caption_template="a photo of a {}."),
    # Tar shards (img2dataset's layout): paths, brace patterns or gs:// URLs; eval_shards
    # for every split but train; samples shuffled in blocks of shuffle_buffer.
    "webdataset": dict(shards="", eval_shards="", shuffle_buffer=1000),
}


def data_fields(name: str) -> dict[str, Any]:
  """Every field source `name`'s `config.data` may have, with its default."""
  if name not in SOURCE_FIELDS:
    raise ConfigError(f"data.name={name!r}: expected one of {sorted(SOURCE_FIELDS)}")
  return copy.deepcopy({**DATA_FIELDS, **SOURCE_FIELDS[name], "name": name})


def data_block(name: str, **fields) -> ml_collections.ConfigDict:
  """`config.data` for source `name`: every field it reads, so that any of them can be
  overridden (`--config.data.train_examples=100`); `fields` change the defaults."""
  block = data_fields(name)
  for key in fields:
    if key not in block:
      near = difflib.get_close_matches(key, list(block), n=1, cutoff=0.5)
      hint = f"; did you mean '{near[0]}'?" if near else ""
      raise ConfigError(f"data_block({name!r}): unknown field '{key}'{hint}")
  return ml_collections.ConfigDict({**block, **fields})


# Params (by path name) that optim.weight_decay leaves alone: biases, norm scales,
# embeddings and temperatures.
NO_DECAY = r"(bias|scale|posemb|cls|token_embed|modality_embed|logit_scale|logit_bias)$"


def base_config() -> ml_collections.ConfigDict:
  """Run-level defaults every config starts from; configs add data, model,
  objectives and evals, and change what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  # Lengths in passes over the train split (> 0 wins over the step key beside it, set once
  # the split's size is known: mmjax/train/epochs.py): total_steps, eval_every,
  # checkpoint_every and optim.warmup_steps.
  c.epochs = 0.0
  c.eval_every_epochs = 0.0
  c.checkpoint_every_epochs = 0.0
  c.stop_after = 0              # >0: stop this process after N steps (checkpointed)
  c.batch_size = 64             # global, over all processes and devices
  c.eval_batch_size = 256
  c.log_every = 50
  c.eval_every = 0              # 0: evaluate at the end only
  c.checkpoint_every = 500
  # Train checkpoints kept in <workdir>/checkpoints (the newest); the one default, so code
  # reads config.keep_checkpoints rather than falling back to a number of its own.
  c.keep_checkpoints = 2
  c.objectives = ml_collections.ConfigDict(dict(contrastive=1.0))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, momentum=0.9,
      schedule="cosine", warmup_steps=100, warmup_epochs=0.0, end_lr_factor=0.0, clip_norm=1.0,
      accum_steps=1, frozen="", no_decay=NO_DECAY))
  # The batch splits over data x fsdp; `model` > 1 is tensor parallelism (mmjax/parallel.py).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.sharding_rules = ()         # ((regex, (axis or None, ...)), ...), e.g. ((r"kernel$", ("fsdp",)),)
  # Params no rule matches: tactic "fsdp" splits each one over min_size_mb on its largest
  # dimension the fsdp axis divides; "rules" replicates them.
  c.sharding = ml_collections.ConfigDict(dict(tactic="rules", min_size_mb=4.0))
  # Multi-process runs: auto=True on TPU VMs / SLURM, else coordinator "host:port".
  c.distributed = ml_collections.ConfigDict(dict(auto=False, coordinator="", num_processes=1,
                                                 process_id=0))
  c.evals = ml_collections.ConfigDict()
  # Stop after `patience` evaluations without `metric` improving by > min_delta, and
  # restore the best params (mmjax/train/early_stop.py); metric "" = off.
  c.early_stop = ml_collections.ConfigDict(dict(metric="", mode="max", patience=3,
                                                min_delta=0.0, keep_best=1))
  # Mixup / cutmix on device for classifiers (mmjax/train/mixing.py); all off here, so
  # `--config.mix.mixup=0.2` works on any config.
  c.mix = ml_collections.ConfigDict(dict(mixup=0.0, cutmix=0.0, prob=1.0, switch_prob=0.5))
  return c
