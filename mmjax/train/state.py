"""The train state: one pytree, saved and restored whole."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from mmjax.train.optimizer import make_optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array         # raw uint32 key; per-step keys are fold_in(rng, step)
  # BatchNorm's running statistics (the "batch_stats" collection); {} without BatchNorm.
  batch_stats: Any = dataclasses.field(default_factory=dict)
  # Pruning masks (config.finetune.prune, mmjax/tuning/prune.py): bool, nested like the
  # params they prune (those only); {} without pruning.
  masks: Any = dataclasses.field(default_factory=dict)


def initial_state(config, params, seed: int | None = None, batch_stats=None) -> TrainState:
  """Step 0 of a run of `config` from `params` (and `batch_stats`): a fresh optimizer
  state, the run's RNG (what `mmjax convert` writes as a converted checkpoint)."""
  tx, _ = make_optimizer(config.optim, params, config.total_steps)
  _, state_rng = jax.random.split(jax.random.PRNGKey(config.seed if seed is None else seed))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng, batch_stats=batch_stats or {})
