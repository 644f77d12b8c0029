"""The one train loop, and evaluation of a trained workdir.

Everything stateful lives here (data iterator, checkpoints, logging, progress);
the step itself is pure and jitted once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from mmjax import data as mmdata
from mmjax import objectives, parallel
from mmjax.evals import EvalContext, run_evals
from mmjax.evals.embed import Embedder
from mmjax.train import early_stop, mixing
from mmjax.train.early_stop import EarlyStopping
from mmjax.tuning.distill import Teacher, load_teacher
from mmjax.tuning.init import towers_from_init
from mmjax.tuning.strategies import Plan, make_plan
from mmjax.models import build_model
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.metrics_writer import MetricWriter
from mmjax.train.optimizer import make_optimizer
from mmjax.train.plot import plot_run
from mmjax.train.state import TrainState
from mmjax.train.steps import make_train_step

log = logging.getLogger("mmjax")


class NonFiniteLoss(RuntimeError):
  pass


@dataclasses.dataclass
class Run:
  """Everything built from a config before the first step."""
  config: ml_collections.ConfigDict
  tokenizer: Any
  model: Any
  mesh: jax.sharding.Mesh
  tx: Any
  schedule: Any
  state: TrainState            # freshly initialised, sharded
  state_sharding: Any
  plan: Plan | None = None     # what trains (config.finetune); None: everything
  teacher: Teacher | None = None   # config.distill's frozen teacher


def dummy_batch(config, batch_size: int = 2) -> dict[str, np.ndarray]:
  s, length = config.data.image_size, config.data.max_len
  return {"image": np.zeros((batch_size, s, s, 3), np.float32),
          "text": np.zeros((batch_size, length), np.int32),
          "text_mask": np.ones((batch_size, length), np.int32)}


def setup(config: ml_collections.ConfigDict, devices=None) -> Run:
  """Tokenizer, model, mesh (over `devices`, default all), optimizer, initial state.
  `run.config` is `config` with what `init.towers` takes from the init checkpoint."""
  config = towers_from_init(config)
  parallel.maybe_initialize_distributed(config)
  tokenizer = mmdata.get_tokenizer(config.data)
  special = {"pad": tokenizer.pad_id, "cls": tokenizer.cls_id, "sep": tokenizer.sep_id,
             "mask": tokenizer.mask_id}
  model = build_model(config, tokenizer.vocab_size, special)
  mesh = parallel.make_mesh(config.get("mesh", {}), devices)
  rules = [tuple(r) for r in config.get("sharding_rules", ())]
  rng = jax.random.PRNGKey(config.get("seed", 0))
  init_rng, state_rng = jax.random.split(rng)
  batch = dummy_batch(config)

  def init_params():
    rngs = dict(zip(("params", "dropout", "itm", "mlm"), jax.random.split(init_rng, 4)))
    return model.init(rngs, batch, train=False)["params"]

  abstract_params = jax.eval_shape(init_params)
  plan = make_plan(config.finetune, abstract_params) if config.get("finetune") else None
  tx, schedule = make_optimizer(config.optim, abstract_params, config.total_steps,
                                plan.lr_scale if plan else None)

  def init_state():
    params = init_params()
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng)

  abstract = jax.eval_shape(init_state)
  state_sharding = parallel.shardings(parallel.param_specs(abstract, rules, mesh), mesh)
  state = jax.jit(init_state, out_shardings=state_sharding)()
  return Run(config, tokenizer, model, mesh, tx, schedule, state, state_sharding, plan,
             load_teacher(config, mesh))


def loss_function(config: ml_collections.ConfigDict):
  """The weighted objectives of `config`, with their `objective_options`."""
  options = {k: dict(v) for k, v in config.get("objective_options", {}).items()}
  return objectives.combined(dict(config.objectives), options)


def delta_base(plan: Plan | None, base: dict, config) -> dict | None:
  """What a fine-tune's checkpoints may leave out: params loaded from the base and
  frozen for the whole run (None: save everything)."""
  if plan is None or config.finetune.get("save_frozen", False):
    return None
  frozen = {parallel.path_name(p) for p, on in
            jax.tree_util.tree_flatten_with_path(plan.trainable)[0] if not on}
  omit = sorted(frozen & set(base["params"]))
  return dict(base, params=omit) if omit else None


def make_step(run: Run, loss_fn=None):
  """The run's train step, jitted with its shardings (state donated)."""
  plan = run.plan
  step = make_train_step(run.model, run.tx, loss_fn or loss_function(run.config), run.schedule,
                         trainable=plan.trainable if plan else None,
                         unfreeze_step=plan.unfreeze_step if plan else None,
                         batch_fn=mixing.batch_fn(run.config),
                         teacher_fn=run.teacher.fn if run.teacher else None)
  shardings = (run.state_sharding, parallel.batch_sharding(run.mesh))
  if run.teacher is None:
    return jax.jit(step, in_shardings=shardings, out_shardings=(run.state_sharding, None),
                   donate_argnums=0)
  jitted = jax.jit(step, in_shardings=shardings + (run.teacher.sharding,),
                   out_shardings=(run.state_sharding, None), donate_argnums=0)
  return lambda state, batch: jitted(state, batch, run.teacher.params)


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _check_finite(pending: list[dict], step: int, ckpt: Checkpointer) -> None:
  finite = np.array([float(m["finite"]) for m in jax.device_get(pending)])
  if (finite < 1).any():
    bad = step - len(finite) + 1 + int(np.argmin(finite))
    ckpt.wait()
    last = ckpt.latest_step()
    where = (f"the last good checkpoint (step {last}) in {ckpt.directory} is intact"
             if last is not None else "no checkpoint had been written yet")
    raise NonFiniteLoss(f"loss or gradients became NaN/inf at step {bad}; training stopped "
                        f"without saving that state, and {where}. Lower optim.lr or set "
                        f"optim.clip_norm.")


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          *, progress: bool = True) -> dict[str, float]:
  """Train `config` in `workdir`, resuming from its latest checkpoint if any.

  Returns the final metrics (eval metrics, steps, seconds, train throughput).
  """
  t0 = time.time()
  workdir = pathlib.Path(workdir)
  run = setup(config)
  c = run.config
  per_process = c.batch_size // jax.process_count()
  if per_process * jax.process_count() != c.batch_size or c.batch_size % jax.device_count():
    raise ValueError(f"batch_size={c.batch_size} must divide over {jax.process_count()} "
                     f"processes and {jax.device_count()} devices")
  iterator = mmdata.make_iterator(c.data, "train", batch_size=per_process, train=True,
                                  tokenizer=run.tokenizer)
  ckpt = Checkpointer(workdir, keep=c.get("keep_checkpoints", 3))
  stopper = EarlyStopping(c, workdir, run.plan) if early_stop.enabled(c) else None
  state, start = run.state, 0
  if ckpt.latest_step() is not None:
    state, data_state, start = ckpt.restore(state)
    if "iterator" in data_state:
      iterator.set_state(data_state["iterator"])
    ckpt.base = data_state.get("base")       # a delta run stays a delta run
    if stopper and "early_stop" in data_state:
      stopper.load_state_dict(data_state["early_stop"])
    log.info("resumed from %s at step %d", ckpt.directory, start)
  elif c.get("init") and c.init.get("path"):
    from mmjax.tuning.init import load_init  # pylint: disable=g-import-not-at-top
    params, info = load_init(c, jax.device_get(state.params))
    state = state.replace(params=jax.device_put(params, run.state_sharding.params))
    ckpt.base = delta_base(run.plan, info["base"], c)
  if run.plan is not None:
    n_train, n_all = run.plan.count(state.params)
    log.info("finetune %s: %d of %d params train (%.2f%%)", c.finetune.strategy, n_train,
             n_all, 100 * n_train / n_all)
  step_fn = make_step(run)
  writer = MetricWriter(workdir)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))

  eval_sources: dict = {}     # held-out sources are built once per run, not per eval

  def evaluate_now(step, record=True):
    ctx = EvalContext(c, run.tokenizer, Embedder(run.model, state.params, run.mesh),
                      workdir=workdir, sources=eval_sources)
    metrics = run_evals(ctx, c.get("evals", {}))
    if record:
      writer.write(step, metrics, kind="eval")
    return metrics

  def data_state():
    d = {"iterator": iterator.get_state()}
    if stopper:
      d["early_stop"] = stopper.state_dict()
    return d

  stop = c.total_steps
  if c.get("stop_after", 0):
    stop = min(stop, start + c.stop_after)
  if stopper and stopper.stopped:
    log.info("%s stopped early at step %d (best step %s); nothing left to train", workdir,
             start, stopper.best_step)
    stop = start
  bar = tqdm(total=c.total_steps, initial=start, disable=not progress or jax.process_index(),
             unit="step", dynamic_ncols=True)
  pending, t_log, n_log = [], time.time(), 0
  eval_metrics: dict[str, float] = {}
  train_seconds, train_steps = 0.0, 0
  for step in range(start + 1, stop + 1):
    batch = parallel.device_batch(next(iterator), run.mesh)
    state, metrics = step_fn(state, batch)
    pending.append(metrics)
    n_log += 1
    bar.update(1)
    if step % c.get("log_every", 50) == 0 or step == stop:
      _check_finite(pending, step, ckpt)
      mean = _mean_metrics(pending)
      dt = time.time() - t_log
      mean.update(steps_per_s=n_log / dt, images_per_s=n_log * c.batch_size / dt)
      if step > start + n_log:     # the first window includes compilation
        train_seconds += dt
        train_steps += n_log
      writer.write(step, mean)
      bar.set_postfix(loss=f"{mean['loss']:.3f}", steps_s=f"{mean['steps_per_s']:.1f}",
                      img_s=f"{mean['images_per_s']:.0f}")
      pending, t_log, n_log = [], time.time(), 0
    if c.get("checkpoint_every", 0) and step % c.checkpoint_every == 0 and step != stop:
      _check_finite(pending, step, ckpt)
      ckpt.save(step, state, data_state(), c.to_json_best_effort())
    if c.get("eval_every", 0) and step % c.eval_every == 0 and step != stop:
      eval_metrics = evaluate_now(step)
      t_log = time.time()
      if stopper and stopper.update(step, eval_metrics, state.params):
        log.info("early stop at step %d: %s has not improved by > %g for %d evaluations "
                 "(best %.4f at step %d)", step, stopper.metric, stopper.min_delta,
                 stopper.patience, stopper.best, stopper.best_step)
        stop = step
        break
  bar.close()
  if stop == c.total_steps and not (stopper and stopper.stopped):
    eval_metrics = evaluate_now(stop)
    if stopper and stop > start:
      stopper.update(stop, eval_metrics, state.params)
  finished = stop == c.total_steps or (stopper is not None and stopper.stopped)
  if stopper and finished and stop > start and stopper.best_step not in (None, stop):
    state = state.replace(params=stopper.best_params(state.params))
    eval_metrics = evaluate_now(stop, record=False)    # the restored best (reports too)
  if stop > start:
    ckpt.save(stop, state, data_state(), c.to_json_best_effort())
  ckpt.wait()
  ckpt.close()
  writer.close()
  result = dict(eval_metrics, steps=stop, seconds=round(time.time() - t0, 1))
  if stopper:
    result.update(best_step=stopper.best_step, early_stopped=stopper.stopped)
    stopper.close()
  if train_steps:
    result["train_images_per_s"] = round(train_steps * c.batch_size / train_seconds, 1)
  if jax.process_index() == 0:
    plot_run(workdir)
  return result


def restore(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
            step: int | None = None) -> tuple[Run, TrainState, int]:
  """The run built from `config` and the train state of `workdir`'s checkpoint."""
  run = setup(config)
  ckpt = Checkpointer(workdir, keep=config.get("keep_checkpoints", 3))
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first "
                            f"(mmjax train --workdir {workdir})")
  state, _, step = ckpt.restore(run.state, step)
  ckpt.close()
  return run, state, step


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
             step: int | None = None) -> dict[str, float]:
  """Run `config.evals` on the latest (or given) checkpoint of `workdir`."""
  run, state, step = restore(config, workdir, step)
  ctx = EvalContext(run.config, run.tokenizer, Embedder(run.model, state.params, run.mesh),
                    workdir=pathlib.Path(workdir))
  return dict(run_evals(ctx, run.config.get("evals", {})), step=step)
