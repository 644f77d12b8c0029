"""Pure train and eval steps; the loop jits them once with shardings."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mmjax.models import variables
from mmjax.train.state import TrainState

RNG_STREAMS = ("dropout", "itm", "mlm", "mix")


def step_rngs(rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
  keys = jax.random.split(jax.random.fold_in(rng, step), len(RNG_STREAMS))
  return dict(zip(RNG_STREAMS, keys))


def make_train_step(model, tx: optax.GradientTransformation, loss_fn: Callable,
                    schedule: optax.Schedule, trainable: Any = None,
                    unfreeze_step: Any = None, batch_fn: Callable | None = None,
                    teacher_fn: Callable | None = None, stats_from: Any = None,
                    prune_fn: Callable | None = None) -> Callable:
  """(state, batch[, teacher_params]) -> (state, metrics). A step whose loss or
  gradients are not finite leaves the state untouched and reports `finite = 0`.
  A model with BatchNorm (state.batch_stats not {}) normalises with the batch's
  statistics and updates the running ones.

  trainable: a bool per param (a finetune Plan's); False ones are held constant
    (stop_gradient), so no backward pass runs for what only they need.
  unfreeze_step: an int per param (progressive unfreezing); before that step the
    param's gradient and update are zeroed (no moments, no weight decay). The
    mask reads state.step inside the step, so it compiles once for every stage.
  batch_fn: (batch, rng) -> batch, a train-time transform of the whole batch on
    device (mixup / cutmix) before the model sees it.
  teacher_fn: (teacher_params, batch) -> {name: array}, a frozen teacher's outputs
    (distillation); the loss sees them as outputs["teacher_<name>"].
  stats_from: an int per batch_stats leaf, the step from which it updates (a frozen
    norm's statistics stay as loaded; see Plan.stats_from).
  prune_fn: (params, masks, step) -> (params, masks): magnitude pruning after the update
    (mmjax/tuning/prune.py Pruner), the masks kept in state.masks.
  """

  def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_params: Any = None):
    rngs = step_rngs(state.rng, state.step)
    mix_rng = rngs.pop("mix")
    if batch_fn is not None:
      batch = batch_fn(batch, mix_rng)
    teacher = {}
    if teacher_fn is not None:
      teacher = {f"teacher_{k}": jax.lax.stop_gradient(v)
                 for k, v in teacher_fn(teacher_params, batch).items()}

    def compute(params):
      if trainable is not None:
        params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params,
                              trainable)
      outputs, stats = apply_train(model, params, state.batch_stats, batch, rngs)
      loss, metrics = loss_fn(dict(outputs, **teacher), batch)
      return loss, (metrics, stats)

    (loss, (metrics, stats)), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
    if stats_from is not None:
      stats = jax.tree.map(lambda n, o, s: jnp.where(state.step >= s, n, o), stats,
                           state.batch_stats, stats_from)
    if unfreeze_step is not None:
      live = lambda tree: jax.tree.map(lambda x, s: jnp.where(state.step >= s, x, 0), tree,
                                       unfreeze_step)
      grads = live(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if unfreeze_step is not None:
      updates = live(updates)
    params = optax.apply_updates(state.params, updates)
    masks = state.masks
    if prune_fn is not None:
      params, masks = prune_fn(params, masks, state.step + 1)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              batch_stats=keep(stats, state.batch_stats),
                              masks=keep(masks, state.masks))
    metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step),
                   finite=finite.astype(jnp.float32))
    return new_state, metrics

  return train_step


def apply_train(model, params, batch_stats, batch, rngs) -> tuple[Any, Any]:
  """(train-mode outputs, BatchNorm statistics updated by the batch; {} without any)."""
  if not batch_stats:
    return model.apply({"params": params}, batch, train=True, rngs=rngs), batch_stats
  outputs, updated = model.apply(variables(params, batch_stats), batch, train=True, rngs=rngs,
                                 mutable=["batch_stats"])
  return outputs, updated["batch_stats"]


def make_eval_loss(model, loss_fn: Callable) -> Callable:
  """(params, batch, rng[, batch_stats]) -> metrics of the training objectives on held-out
  data (BatchNorm with its running statistics)."""

  def eval_loss(params, batch, rng, batch_stats=None):
    outputs = model.apply(variables(params, batch_stats), batch, train=False,
                          rngs=step_rngs(rng, 0))
    return loss_fn(outputs, batch)[1]

  return eval_loss
