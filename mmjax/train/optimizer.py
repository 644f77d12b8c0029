"""The optax chain from `config.optim`.

  clip (global norm) -> optimizer (AdamW / SGD / Lion, decay masked) ->
  frozen params: set_to_zero (and no optimizer state) -> accumulation (MultiSteps)
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


def make_optimizer(o, params: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                              optax.Schedule]:
  schedule = make_schedule(o, total_steps)
  decay_mask = label_params(params, o.get("no_decay", NO_DECAY), False, True)
  wd = o.get("weight_decay", 0.0)
  name = o.get("name", "adamw")
  if name == "adamw":
    opt = optax.adamw(schedule, b1=o.get("b1", 0.9), b2=o.get("b2", 0.999),
                      eps=o.get("eps", 1e-8), weight_decay=wd, mask=decay_mask)
  elif name == "lion":
    opt = optax.lion(schedule, b1=o.get("b1", 0.9), b2=o.get("b2", 0.99), weight_decay=wd,
                     mask=decay_mask)
  elif name == "sgd":
    opt = optax.chain(optax.add_decayed_weights(wd, decay_mask),
                      optax.sgd(schedule, momentum=o.get("momentum", 0.9) or None))
  else:
    raise ValueError(f"optim.name={name!r}: expected adamw, sgd or lion")
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.get("clip_norm", 0.0) else []
  frozen = o.get("frozen", "")
  if frozen:
    labels = label_params(params, frozen, "frozen", "train")
    opt = optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)
  tx = optax.chain(*parts, opt)
  if o.get("accum_steps", 1) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.accum_steps)
  return tx, schedule
