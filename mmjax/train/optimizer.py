"""The optax chain from `config.optim`.

  clip (global norm) -> optimizer (AdamW / SGD / Lion, decay masked) ->
  frozen params: set_to_zero (and no optimizer state) -> accumulation (MultiSteps)

Per-param learning-rate scales (from `mmjax.tuning`: layer-wise decay, per-group
or per-tower rates) become one optimizer per distinct scale in the multi_transform,
each on the scaled schedule; scale 0 is frozen like `optim.frozen`.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import optax

from mmjax.parallel import path_name

# Biases, norm scales, embeddings and temperatures are not decayed by default.
NO_DECAY = r"(bias|scale|posemb|cls|token_embed|modality_embed|logit_scale|logit_bias)$"


def make_schedule(o, total_steps: int) -> optax.Schedule:
  warmup = min(o.get("warmup_steps", 0), total_steps)
  kind = o.get("schedule", "cosine")
  rest = max(total_steps - warmup, 1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(o.lr, rest, alpha=o.get("end_lr_factor", 0.0))
  elif kind == "linear":
    decay = optax.linear_schedule(o.lr, o.lr * o.get("end_lr_factor", 0.0), rest)
  elif kind == "constant":
    decay = optax.constant_schedule(o.lr)
  else:
    raise ValueError(f"optim.schedule={kind!r}: expected cosine, linear or constant")
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), decay], [warmup])


def label_params(params: Any, pattern: str, hit: Any, miss: Any) -> Any:
  """A pytree like `params`: `hit` where the path name matches `pattern`."""
  rx = re.compile(pattern) if pattern else None
  return jax.tree_util.tree_map_with_path(
      lambda p, _: hit if rx is not None and rx.search(path_name(p)) else miss, params)


def _base_optimizer(o, schedule, decay_mask) -> optax.GradientTransformation:
  wd = o.get("weight_decay", 0.0)
  name = o.get("name", "adamw")
  if name == "adamw":
    return optax.adamw(schedule, b1=o.get("b1", 0.9), b2=o.get("b2", 0.999),
                       eps=o.get("eps", 1e-8), weight_decay=wd, mask=decay_mask)
  if name == "lion":
    return optax.lion(schedule, b1=o.get("b1", 0.9), b2=o.get("b2", 0.99), weight_decay=wd,
                      mask=decay_mask)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(wd, decay_mask),
                       optax.sgd(schedule, momentum=o.get("momentum", 0.9) or None))
  raise ValueError(f"optim.name={name!r}: expected adamw, sgd or lion")


def _group(scale: float) -> str:
  return "frozen" if scale == 0 else "train" if scale == 1 else f"lr_x{scale:.6g}"


def make_optimizer(o, params: Any, total_steps: int, lr_scale: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The chain for `config.optim`; `lr_scale` (a float per param, like `params`)
  scales each param's learning rate, 0 freezing it."""
  schedule = make_schedule(o, total_steps)
  no_decay = o.get("no_decay", NO_DECAY)
  # A callable mask: inside multi_transform it sees only its own group's params.
  decay_mask = lambda p: label_params(p, no_decay, False, True)
  if lr_scale is None:
    lr_scale = jax.tree.map(lambda _: 1.0, params)
  frozen = label_params(params, o.get("frozen", ""), True, False)
  labels = jax.tree.map(lambda s, f: _group(0.0 if f else float(s)), lr_scale, frozen)
  names = set(jax.tree.leaves(labels))
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.get("clip_norm", 0.0) else []
  if names == {"train"}:
    opt = _base_optimizer(o, schedule, decay_mask)
  else:
    scale_of = {_group(float(s)): float(s) for s in jax.tree.leaves(lr_scale)}
    groups = {"frozen": optax.set_to_zero()} if "frozen" in names else {}
    for n in sorted(names - {"frozen"}):
      scaled = schedule if n == "train" else (lambda c, k=scale_of[n]: k * schedule(c))
      groups[n] = _base_optimizer(o, scaled, decay_mask)
    opt = optax.multi_transform(groups, labels)
  tx = optax.chain(*parts, opt)
  if o.get("accum_steps", 1) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.accum_steps)
  return tx, schedule
