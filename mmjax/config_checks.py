"""`validate(config)`: a loaded config checked before anything is built or computed.

Every number that has a valid range is checked against it, and every group with a
fixed set of keys (`optim`, `early_stop`, `mix`, `evals.<name>`, ...) is checked for
keys the code would silently ignore, such as a typo in a config file or in a
dict-valued override (`--config.early_stop="{'metrc': 'report_acc'}"`). Errors
are `ConfigError`s that name the key, its value and what is allowed. Only keys
that are present are checked, because configs differ in what they have.

Imports nothing from mmjax but mmjax.config, so checking costs no JAX start-up.
Tables here that mirror a registry elsewhere (FINETUNE_KEYS, EVAL_FIELDS, ...) are
kept in step by tests/test_config_checks.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from typing import Any, Iterable

import ml_collections

from mmjax import objectives as objectives_lib
from mmjax.config import ConfigError, base_config, data_fields


@dataclasses.dataclass(frozen=True)
class Range:
  """Finite numbers from `lo` to `hi`; `open` names the ends left out ("lo", "hi")."""
  lo: float = -math.inf
  hi: float = math.inf
  integer: bool = False
  open: tuple[str, ...] = ()

  def __contains__(self, value: Any) -> bool:
    kinds = int if self.integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
      return False
    above = value > self.lo if "lo" in self.open else value >= self.lo
    below = value < self.hi if "hi" in self.open else value <= self.hi
    return above and below

  def __str__(self) -> str:
    kind = "an integer" if self.integer else "a finite number"
    if self.hi == math.inf:
      return f"{kind} {'>' if 'lo' in self.open else '>='} {self.lo:g}"
    left, right = "(" if "lo" in self.open else "[", ")" if "hi" in self.open else "]"
    return f"{kind} in {left}{self.lo:g}, {self.hi:g}{right}"


def _at_least(lo: int) -> Range:
  return Range(lo, integer=True)


PROBABILITY = Range(0, 1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, open=("lo",))
BETA = Range(0, 1, open=("hi",))      # Adam's b1 / b2, SGD momentum: 1 would never forget

# Dotted key -> allowed values; "*" stands for every key of the group above it.
RANGES: dict[str, Range] = {
    "total_steps": _at_least(1),
    "stop_after": _at_least(0),            # 0: no stop
    "batch_size": _at_least(1),
    "eval_batch_size": _at_least(1),
    "log_every": _at_least(1),
    "eval_every": _at_least(0),            # 0: at the end only
    "checkpoint_every": _at_least(0),      # 0: at the end only
    "keep_checkpoints": _at_least(1),
    "epochs": NON_NEGATIVE,                # 0: total_steps; > 0 sets it (mmjax/train/epochs.py)
    "eval_every_epochs": NON_NEGATIVE,
    "checkpoint_every_epochs": NON_NEGATIVE,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.lr": POSITIVE,
    "init.lr": NON_NEGATIVE,               # 0: optim.lr
    "optim.b1": BETA,
    "optim.b2": BETA,
    "optim.eps": NON_NEGATIVE,
    "optim.momentum": BETA,
    "optim.weight_decay": NON_NEGATIVE,
    # May exceed total_steps: the schedule then warms up over the whole run, so a short
    # smoke run (`--config.total_steps=5`, the "tiny" args) needs no warmup edit.
    "optim.warmup_steps": _at_least(0),
    "optim.end_lr_factor": NON_NEGATIVE,
    "optim.clip_norm": NON_NEGATIVE,       # 0: no clipping
    "optim.accum_steps": _at_least(1),
    "objectives.*": NON_NEGATIVE,
    "objective_options.*.label_smoothing": PROBABILITY,
    "objective_options.*.temperature": POSITIVE,
    "model.dropout": PROBABILITY,
    "model.drop_path": PROBABILITY,
    "model.mlm_prob": PROBABILITY,
    "data.image_size": _at_least(1),
    "data.max_len": _at_least(2),          # room for [CLS] and [SEP]
    "data.num_workers": _at_least(0),
    "data.vocab_size": _at_least(1),
    "data.train_examples": _at_least(0),   # 0: all
    "data.test_fraction": Range(0, 1, open=("hi",)),   # 0: the splits as given
    "data.train_size": _at_least(1),
    "data.eval_size": _at_least(1),
    "data.shuffle_buffer": _at_least(1),   # webdataset: samples per shuffled block
    "mix.mixup": NON_NEGATIVE,             # Beta alphas; 0: off
    "mix.cutmix": NON_NEGATIVE,
    "mix.prob": PROBABILITY,
    "mix.switch_prob": PROBABILITY,
    "distill.temperature": POSITIVE,
    "early_stop.patience": _at_least(1),
    "early_stop.min_delta": NON_NEGATIVE,
    "early_stop.keep_best": _at_least(1),
    "distributed.num_processes": _at_least(1),
    "distributed.process_id": _at_least(0),
    "finetune.prune.sparsity": Range(0, 1, open=("hi",)),    # 0: off
    "finetune.prune.begin_step": _at_least(0),
    "finetune.prune.end_step": _at_least(0),                # 0: the last step
    "sharding.min_size_mb": NON_NEGATIVE,
}
CHOICES: dict[str, tuple[str, ...]] = {
    "early_stop.mode": ("max", "min"),
    "model.quantize.mode": ("", "int8-weight", "w8a8"),      # mmjax/models/quantized.py
    "finetune.quantize.weight": ("", "int8"),
    "finetune.quantize.act": ("", "int8"),
    "finetune.prune.schedule": ("gradual", "oneshot"),       # mmjax/tuning/prune.py
    "finetune.prune.scope": ("global", "layer"),
    "sharding.tactic": ("rules", "fsdp"),      # mmjax/parallel.py TACTICS
    # mmjax/models/layers.py REMAT_POLICIES, plus "none"
    "model.remat": ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                    "checkpoint_dots", "checkpoint_dots_with_no_batch_dims",
                    "everything_saveable"),
}

_BASE = base_config()
# Top-level keys: base_config's, plus the groups configs add.
TOP_KEYS = (*_BASE, "data", "model", "objective_options", "finetune", "init", "distill", "mix")
# Groups with a fixed set of keys (mmjax/tuning/config.py, mmjax/train/mixing.py,
# mmjax/tuning/distill.py, mmjax/models/registry.py).
FINETUNE_KEYS = ("strategy", "freeze_towers", "freeze_bottom", "freeze_regex", "modality",
                 "modality_lr_scale", "unfreeze_every", "unfreeze_depth", "unfreeze_towers",
                 "lora_rank", "lora_alpha", "lora_targets", "adapter_dim", "layer_decay",
                 "lr_groups", "save_frozen", "quantize", "prune")
GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "optim": tuple(_BASE.optim),
    "mesh": tuple(_BASE.mesh),
    "sharding": tuple(_BASE.sharding),
    "distributed": tuple(_BASE.distributed),
    "early_stop": tuple(_BASE.early_stop),
    "mix": ("mixup", "cutmix", "prob", "switch_prob"),
    "distill": ("teacher", "step", "temperature"),
    "finetune": FINETUNE_KEYS,
    "init": ("path", "step", "new", "ignore", "lr", "towers"),
    "model.classifier": ("input", "num_classes"),
    "model.quantize": ("mode", "static"),      # written by mmjax quantize
    "finetune.quantize": ("weight", "act"),
    "finetune.prune": ("sparsity", "schedule", "scope", "targets", "begin_step", "end_step"),
    "model.decoder": ("cross_attention", "prefix_lm", "tie_embed", "image_prefix"),
}
# Evaluator type (mmjax/evals EVALUATORS) -> the fields it reads besides these.
EVAL_COMMON = ("type", "split", "data")
EVAL_FIELDS: dict[str, tuple[str, ...]] = {
    "zeroshot": ("label", "templates", "ensemble", "classnames"),
    "retrieval": (),
    "itm": (),
    "linear_probe": ("label", "train_split", "train_examples", "C"),
    "classification": ("label", "classnames"),
    "ner": ("label", "classnames"),
    "captioning": ("max_new_tokens", "examples"),
    "vqa_gen": ("max_new_tokens", "examples"),
}


def validate(config: ml_collections.ConfigDict, *, process_count: int = 1,
             device_count: int = 1, training: bool = True) -> None:
  """Raise ConfigError on the first bad value or unknown key of `config`.

  `process_count` / `device_count` are the run's (jax.process_count(),
  jax.device_count()): batches must split evenly over them. `training=False`
  (evaluation) allows a config without objectives and skips train-only checks.
  """
  _check_keys(config)
  for pattern, allowed in RANGES.items():
    for key in _expand(config, pattern):
      value = _get(config, key)
      if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected {allowed}")
  for key, choices in CHOICES.items():
    value = _get(config, key)
    if value is not _ABSENT and value not in choices:
      raise ConfigError(f"{key}={value!r}: expected one of {choices}")
  _check_batches(config, process_count, device_count, training)
  _check_mesh(config.get("mesh"), device_count)
  if training:
    _check_training(config)


_ABSENT = object()


def _get(config, key: str) -> Any:
  """config[a][b] for key "a.b" (the config itself for ""); _ABSENT when a part is missing."""
  node = config
  for part in filter(None, key.split(".")):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return _ABSENT
    node = node[part]
  return node


def _expand(config, pattern: str) -> list[str]:
  """The keys present in `config` that `pattern` names, "*" standing for each key of
  its group: "objectives.*" -> ["objectives.contrastive", "objectives.itm"]."""
  keys = [""]
  for part in pattern.split("."):
    keys = [f"{key}.{name}" if key else name for key in keys
            for name in (_children(config, key) if part == "*" else [part])]
  return [key for key in keys if _get(config, key) is not _ABSENT]


def _children(config, key: str) -> list[str]:
  node = _get(config, key)
  return list(node) if isinstance(node, ml_collections.ConfigDict) else []


def _unknown(group: str, keys: Iterable[str], known: Iterable[str]) -> None:
  """Raise for the first of `keys` not in `known`, naming the nearest known key."""
  known = list(known)
  for key in keys:
    if key not in known:
      where = f"{group}.{key}" if group else key
      near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
      hint = f"; did you mean '{group + '.' if group else ''}{near[0]}'?" if near else ""
      raise ConfigError(f"unknown config key '{where}'{hint} (known: {sorted(known)})")


def _check_keys(config) -> None:
  _unknown("", config, TOP_KEYS)
  for group, known in GROUP_KEYS.items():
    node = _get(config, group)
    if isinstance(node, ml_collections.ConfigDict):
      _unknown(group, node, known)
  data = config.get("data")
  if isinstance(data, ml_collections.ConfigDict):
    fields = data_fields(data.get("name", ""))
    _unknown("data", data, fields)
  for name, ev in (config.get("evals") or {}).items():
    if not isinstance(ev, ml_collections.ConfigDict):
      raise ConfigError(f"evals.{name}={ev!r}: expected a dict with a 'type'")
    kind = ev.get("type")
    if kind not in EVAL_FIELDS:
      near = difflib.get_close_matches(str(kind), list(EVAL_FIELDS), n=1, cutoff=0.5)
      hint = f"; did you mean {near[0]!r}?" if near else ""
      raise ConfigError(f"evals.{name}.type={kind!r} unknown{hint} (known: {sorted(EVAL_FIELDS)})")
    _unknown(f"evals.{name}", ev, EVAL_COMMON + EVAL_FIELDS[kind])
    if isinstance(data, ml_collections.ConfigDict):
      _unknown(f"evals.{name}.data", ev.get("data") or {}, fields)
  options, objectives = config.get("objective_options") or {}, config.get("objectives") or {}
  for name in options:
    if name not in objectives:
      raise ConfigError(f"objective_options.{name}: '{name}' is not in objectives "
                        f"{sorted(objectives)}, so nothing would read its options")
    if name not in objectives_lib.OBJECTIVES:
      continue      # an unknown objective is reported by the objectives check
    takes = [p for p in inspect.signature(objectives_lib.OBJECTIVES[name]).parameters
             if p not in ("outputs", "batch")]
    for option in options[name] or {}:
      if option not in takes:
        raise ConfigError(f"objective_options.{name}.{option}: the {name} objective has no "
                          f"option {option!r} (its options: {takes})")


def _check_batches(config, process_count: int, device_count: int, training: bool) -> None:
  for key in ("batch_size", "eval_batch_size") if training else ("eval_batch_size",):
    size = config.get(key)
    if size is not None and (size % process_count or size % device_count):
      raise ConfigError(f"{key}={size} must divide over {process_count} processes and "
                        f"{device_count} devices")


def _check_mesh(mesh, device_count: int) -> None:
  if not isinstance(mesh, ml_collections.ConfigDict) or not mesh:
    return      # absent or {}: parallel.make_mesh's default, every device on "data"
  for axis, size in mesh.items():
    if size != -1 and size not in _at_least(1):
      raise ConfigError(f"mesh.{axis}={size!r}: expected an integer >= 1, or -1 for every "
                        "device the other axes leave")
  sizes = list(mesh.values())
  if sizes.count(-1) > 1:
    raise ConfigError(f"mesh {mesh.to_dict()}: at most one axis may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  fits = device_count % fixed == 0 if -1 in sizes else fixed == device_count
  if not fits:
    raise ConfigError(f"mesh {mesh.to_dict()} does not fit the {device_count} devices present")


def _check_training(config) -> None:
  if ((config.get("model") or {}).get("quantize") or {}).get("mode"):
    raise ConfigError(f"model.quantize.mode={config.model.quantize.mode!r}: a workdir written "
                      "by mmjax quantize holds int8 weights for inference; fine-tune the float "
                      "workdir instead (finetune.quantize trains quantization-aware)")
  objectives = config.get("objectives") or {}
  if not any(w > 0 for w in objectives.values()):
    raise ConfigError(f"objectives={dict(objectives)}: training needs at least one "
                      "objective with a weight > 0")
  steps, optim = config.get("total_steps", 1), config.get("optim") or {}
  accum = optim.get("accum_steps", 1)
  if steps % accum:
    raise ConfigError(f"optim.accum_steps={accum} must divide total_steps={steps}: each "
                      f"update sums {accum} steps' gradients, so the last {steps % accum} "
                      "would never be applied")
  early = config.get("early_stop") or {}
  if early.get("metric"):
    if not config.get("eval_every"):
      raise ConfigError(f"early_stop.metric={early.metric!r} needs evaluations during "
                        "training: set eval_every > 0")
    names = sorted(config.get("evals") or {})
    if not any(early.metric.startswith(f"{name}_") for name in names):
      raise ConfigError(f"early_stop.metric={early.metric!r} is no evaluator's metric: "
                        f"they are '<name>_<metric>' with a name of evals {names}")
