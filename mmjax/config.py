"""Configs are Python: `configs/<name>.py` defines `get_config(arg=None)`.

`load_config("configs/demo.py:tiny", ["--config.optim.lr=1e-3"])` loads, applies
overrides and locks. A key that does not exist is an error naming the key and
the nearest valid one, raised before anything is computed.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
from typing import Any, Sequence

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


def _parse(raw: str, old: Any, key: str) -> Any:
  if isinstance(old, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if old is None:
      return raw
    raise ConfigError(f"--config.{key}={raw}: cannot parse as {type(old).__name__}") from None
  if isinstance(old, bool) and not isinstance(value, bool):
    raise ConfigError(f"--config.{key}={raw}: expected True or False")
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  if isinstance(old, ml_collections.ConfigDict) and isinstance(value, dict):
    return ml_collections.ConfigDict(value)   # replaces the whole sub-config
  if old is not None and not isinstance(value, type(old)):
    raise ConfigError(f"--config.{key}={raw}: expected {type(old).__name__}, got "
                      f"{type(value).__name__}")
  return value


def set_key(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Set a dotted key from its command-line string; the key must exist."""
  node = cfg
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise _unknown(key, cfg)
    if i < len(parts) - 1:
      node = node[part]
  with node.unlocked():
    node[parts[-1]] = _parse(raw, node[parts[-1]], key)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  for item in overrides:
    if not item.startswith("--config."):
      raise ConfigError(f"override {item!r} must look like --config.key=value")
    key, eq, raw = item[len("--config."):].partition("=")
    if not eq:
      raise ConfigError(f"override {item!r} has no '=value'")
    set_key(cfg, key, raw)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`spec` is a path to a config file or a built-in name, with optional ':arg'."""
  path, arg = _resolve(spec)
  module_spec = importlib.util.spec_from_file_location(f"mmjax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg=None)")
  cfg = module.get_config(arg) if arg is not None else module.get_config()
  apply_overrides(cfg, overrides)
  cfg.lock()
  return cfg


def tower(**fields) -> ml_collections.ConfigDict:
  """A tower's config: a named `variant` ("B/16", "mu") and/or explicit sizes
  (0 = from the variant)."""
  base = dict(variant="", width=0, depth=0, heads=0, mlp_dim=0, pool="cls", act="gelu")
  return ml_collections.ConfigDict({**base, **fields})


def base_config() -> ml_collections.ConfigDict:
  """Run-level defaults every config starts from; configs add data, model,
  objectives and evals, and change what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.stop_after = 0              # >0: stop this process after N steps (checkpointed)
  c.batch_size = 64             # global, over all processes and devices
  c.eval_batch_size = 256
  c.log_every = 50
  c.eval_every = 0              # 0: evaluate at the end only
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.objectives = ml_collections.ConfigDict(dict(contrastive=1.0))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.05, momentum=0.9,
      schedule="cosine", warmup_steps=100, end_lr_factor=0.0, clip_norm=1.0,
      accum_steps=1, frozen=""))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.sharding_rules = ()         # ((regex, (axis or None, ...)), ...), e.g. ((r"kernel$", ("fsdp",)),)
  # Multi-process runs: auto=True on TPU VMs / SLURM, else coordinator "host:port".
  c.distributed = ml_collections.ConfigDict(dict(auto=False, coordinator="", num_processes=1,
                                                 process_id=0))
  c.evals = ml_collections.ConfigDict()
  # Stop after `patience` evaluations without `metric` improving by > min_delta, and
  # restore the best params (mmjax/train/early_stop.py); metric "" = off.
  c.early_stop = ml_collections.ConfigDict(dict(metric="", mode="max", patience=3,
                                                min_delta=0.0, keep_best=1))
  return c
