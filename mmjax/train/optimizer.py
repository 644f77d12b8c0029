"""The optax chain from `config.optim`.

  clip (global norm) -> optimizer (AdamW / SGD / Lion, decay masked) ->
  frozen params: set_to_zero (and no optimizer state) -> accumulation (MultiSteps)

Per-param learning-rate scales (from `mmjax.tuning`: layer-wise decay, per-group
or per-tower rates) become one optimizer per distinct scale in the multi_transform,
each on the scaled schedule; scale 0 is frozen like `optim.frozen`.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax

from mmjax.config import NO_DECAY, ConfigError
from mmjax.parallel import path_name


def _cosine(o, lr: float, steps: int) -> optax.Schedule:
  return optax.cosine_decay_schedule(lr, steps, alpha=o.get("end_lr_factor", 0.0))


def _linear(o, lr: float, steps: int) -> optax.Schedule:
  return optax.linear_schedule(lr, lr * o.get("end_lr_factor", 0.0), steps)


def _constant(o, lr: float, steps: int) -> optax.Schedule:
  del o, steps
  return optax.constant_schedule(lr)


# optim.schedule -> (optim, peak lr, steps after warmup) -> the rate after warmup; a new
# schedule is a function plus a line here.
SCHEDULES: dict[str, Callable[[Any, float, int], optax.Schedule]] = {
    "cosine": _cosine,
    "linear": _linear,
    "constant": _constant,
}


def make_schedule(o, total_steps: int) -> optax.Schedule:
  """Learning rate by train step: linear warmup to `o.lr`, then `o.schedule`."""
  warmup = min(o.get("warmup_steps", 0), total_steps)
  decay = _lookup(SCHEDULES, o.get("schedule", "cosine"), "optim.schedule")(
      o, o.lr, max(total_steps - warmup, 1))
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), decay], [warmup])


def _lookup(registry: dict[str, Any], name: str, key: str) -> Any:
  if name not in registry:
    raise ConfigError(f"{key}={name!r}: expected one of {sorted(registry)}")
  return registry[name]


def label_params(params: Any, pattern: str, hit: Any, miss: Any) -> Any:
  """A pytree like `params`: `hit` where the path name matches `pattern`."""
  rx = re.compile(pattern) if pattern else None
  return jax.tree_util.tree_map_with_path(
      lambda p, _: hit if rx is not None and rx.search(path_name(p)) else miss, params)


def _adamw(o, schedule, decay_mask) -> optax.GradientTransformation:
  return optax.adamw(schedule, b1=o.get("b1", 0.9), b2=o.get("b2", 0.999), eps=o.get("eps", 1e-8),
                     weight_decay=o.get("weight_decay", 0.0), mask=decay_mask)


def _lion(o, schedule, decay_mask) -> optax.GradientTransformation:
  return optax.lion(schedule, b1=o.get("b1", 0.9), b2=o.get("b2", 0.99),
                    weight_decay=o.get("weight_decay", 0.0), mask=decay_mask)


def _sgd(o, schedule, decay_mask) -> optax.GradientTransformation:
  return optax.chain(optax.add_decayed_weights(o.get("weight_decay", 0.0), decay_mask),
                     optax.sgd(schedule, momentum=o.get("momentum", 0.9) or None))


# optim.name -> (optim, schedule, decay mask) -> the update rule; a new optimizer is a
# builder plus a line here.
OPTIMIZERS: dict[str, Callable[[Any, optax.Schedule, Any], optax.GradientTransformation]] = {
    "adamw": _adamw,
    "lion": _lion,
    "sgd": _sgd,
}


def _base_optimizer(o, schedule, decay_mask) -> optax.GradientTransformation:
  return _lookup(OPTIMIZERS, o.get("name", "adamw"), "optim.name")(o, schedule, decay_mask)


def _group(scale: float) -> str:
  return "frozen" if scale == 0 else "train" if scale == 1 else f"lr_x{scale:.6g}"


def make_optimizer(o, params: Any, total_steps: int, lr_scale: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The chain for `config.optim` and its learning rate by train step; `lr_scale` (a
  float per param, like `params`) scales each param's learning rate, 0 freezing it."""
  schedule = make_schedule(o, total_steps)
  accum = o.get("accum_steps", 1)
  # Under accumulation the optimizer counts updates, one per `accum` train steps; each
  # reads the rate of the first train step it sums, so warmup and decay span total_steps
  # (and the logged lr is the one applied).
  per_update = schedule if accum == 1 else (lambda n: schedule(n * accum))
  no_decay = o.get("no_decay", NO_DECAY)     # configs saved before it was in base_config
  # A callable mask: inside multi_transform it sees only its own group's params.
  decay_mask = lambda p: label_params(p, no_decay, False, True)
  if lr_scale is None:
    lr_scale = jax.tree.map(lambda _: 1.0, params)
  frozen = label_params(params, o.get("frozen", ""), True, False)
  labels = jax.tree.map(lambda s, f: _group(0.0 if f else float(s)), lr_scale, frozen)
  names = set(jax.tree.leaves(labels))
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.get("clip_norm", 0.0) else []
  if names == {"train"}:
    opt = _base_optimizer(o, per_update, decay_mask)
  else:
    scale_of = {_group(float(s)): float(s) for s in jax.tree.leaves(lr_scale)}
    groups = {"frozen": optax.set_to_zero()} if "frozen" in names else {}
    for n in sorted(names - {"frozen"}):
      scaled = per_update if n == "train" else (lambda c, k=scale_of[n]: k * per_update(c))
      groups[n] = _base_optimizer(o, scaled, decay_mask)
    opt = optax.multi_transform(groups, labels)
  tx = optax.chain(*parts, opt)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  return tx, schedule
