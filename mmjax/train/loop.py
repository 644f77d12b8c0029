"""The one train loop, and evaluation of a trained workdir.

Everything stateful lives here (data iterator, checkpoints, logging, progress);
the step itself is pure and jitted once.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from mmjax import data as mmdata
from mmjax import io, objectives, parallel
from mmjax.config_checks import validate
from mmjax.evals import EvalContext, check_evals, run_evals
from mmjax.evals.embed import Embedder
from mmjax.io import layers_layout, storage
from mmjax.io.loading import special_ids
from mmjax.io.trees import CheckpointMismatch, path_name, shapes_by_name, tree_mismatch
from mmjax.models import build_model
from mmjax.models.quantized import keep_quantize
from mmjax.train import epochs, mfu, mixing
from mmjax.train.early_stop import early_stopping
from mmjax.train.metrics_writer import MetricWriter
from mmjax.train.optimizer import make_optimizer
from mmjax.train.plot import plot_run
from mmjax.train.state import TrainState
from mmjax.train.steps import make_train_step
from mmjax.tuning.config import finetune_config, init_config
from mmjax.tuning.distill import Teacher, distill_options, load_teacher
from mmjax.tuning.init import load_init, towers_from_init
from mmjax.tuning.prune import Pruner, measured_sparsity
from mmjax.tuning.prune import options as prune_options
from mmjax.tuning.quantize_aware import qat_model
from mmjax.tuning.strategies import Plan, make_plan

log = logging.getLogger("mmjax")


class NonFiniteLoss(RuntimeError):
  pass


@dataclasses.dataclass
class Run:
  """Everything built from a config before the first step. The state is abstract
  (shapes, dtypes, shardings) until `run.state` is first read, so a resumed run
  never initialises params it is about to overwrite."""
  config: ml_collections.ConfigDict
  tokenizer: Any
  model: Any
  mesh: jax.sharding.Mesh
  tx: Any
  schedule: Any
  abstract: TrainState         # jax.ShapeDtypeStruct leaves with their shardings
  state_sharding: Any
  init_state: Callable[[], TrainState]
  plan: Plan | None = None     # what trains (config.finetune); None: everything
  teacher: Teacher | None = None   # config.distill's frozen teacher
  sources: mmdata.Sources = dataclasses.field(default_factory=mmdata.Sources)
  pruner: Pruner | None = None     # config.finetune.prune's masks and schedule

  @functools.cached_property
  def state(self) -> TrainState:
    """The freshly initialised state, sharded."""
    return jax.jit(self.init_state, out_shardings=self.state_sharding)()


def dummy_batch(config, batch_size: int = 2) -> dict[str, np.ndarray]:
  s, length = config.data.image_size, config.data.max_len
  return {"image": np.zeros((batch_size, s, s, 3), np.float32),
          "text": np.zeros((batch_size, length), np.int32),
          "text_mask": np.ones((batch_size, length), np.int32)}


def _init_variables_fn(model, config, rng) -> Callable[[], dict]:
  """() -> a fresh model's {"params", "batch_stats"} (batch_stats {} without BatchNorm)."""
  batch = dummy_batch(config)

  def init_variables():
    rngs = dict(zip(("params", "dropout", "itm", "mlm"), jax.random.split(rng, 4)))
    got = model.init(rngs, batch, train=False)
    return {"params": got["params"], "batch_stats": got.get("batch_stats", {})}

  return init_variables


def prepare(config: ml_collections.ConfigDict, training: bool = True
            ) -> ml_collections.ConfigDict:
  """Everything that can be checked before anything is built (the config's values and
  keys, evaluator names, the batch over this runtime's processes and devices); returns
  the config with what `init.towers` takes from the init checkpoint."""
  parallel.maybe_initialize_distributed(config)
  validate(config, process_count=jax.process_count(), device_count=jax.device_count(),
           training=training)
  check_evals(config.get("evals", {}))
  return towers_from_init(config)


def train_examples(config, sources: mmdata.Sources) -> int:
  """Examples in an epoch: the train split, or its `data.train_examples` subset."""
  return config.data.get("train_examples", 0) or len(sources.get(config.data, "train"))


def classes_from_data(config, sources: mmdata.Sources) -> ml_collections.ConfigDict:
  """`config` with `model.classifier.num_classes` = the train split's number of classes
  when it trains a classifier (objective `classify`) and leaves the count at 0: a
  config for the user's own folder cannot know it."""
  classifier = config.model.get("classifier") or {}
  if "classify" not in config.get("objectives", {}) or classifier.get("num_classes", 0):
    return config
  label = config.get("objective_options", {}).get("classify", {}).get("label", "label")
  names = sources.get(config.data, "train").label_names
  if label not in names:
    raise mmdata.DataError(f"objective classify reads label {label!r}, which the train "
                           f"split does not have (its labels: {sorted(names)}); set "
                           f"data.label_key or objective_options.classify.label")
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.classifier = ml_collections.ConfigDict(
        dict(input=classifier.get("input", "image"), num_classes=len(names[label])))
  return config


def setup(config: ml_collections.ConfigDict, devices=None, *, teacher: bool = True) -> Run:
  """Tokenizer, model, mesh (over `devices`, default all), optimizer, abstract state and
  (with `teacher`) the distillation teacher. `run.config` is `config` with what
  `init.towers` takes from the init checkpoint."""
  config = prepare(config)
  sources = mmdata.Sources()     # one per run: tokenizer, train iterator and evals share it
  config = epochs.resolve(config, lambda: train_examples(config, sources))
  config = classes_from_data(config, sources)
  tokenizer = mmdata.get_tokenizer(config.data, sources=sources)
  model = build_model(config, tokenizer.vocab_size, special_ids(tokenizer))
  model = qat_model(model, config)           # config.finetune.quantize: fake-quantized
  pruner = Pruner.from_config(config.get("finetune"), config.total_steps)
  mesh = parallel.make_mesh(config.get("mesh", {}), devices)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.get("seed", 0)))
  init_variables = _init_variables_fn(model, config, init_rng)
  abstract_params = jax.eval_shape(init_variables)["params"]
  if pruner:
    pruner.names(abstract_params)       # fails here, naming the regex, if it matches none
  plan = make_plan(config.finetune, abstract_params) if config.get("finetune") else None
  tx, schedule = make_optimizer(config.optim, abstract_params, config.total_steps,
                                plan.lr_scale if plan else None)

  def init_state():
    fresh = init_variables()
    return TrainState(step=jnp.zeros((), jnp.int32), params=fresh["params"],
                      opt_state=tx.init(fresh["params"]), rng=state_rng,
                      batch_stats=fresh["batch_stats"],
                      masks=pruner.init_masks(fresh["params"]) if pruner else {})

  shapes = jax.eval_shape(init_state)
  state_sharding = parallel.shardings(parallel.config_specs(config, shapes, mesh), mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, state_sharding)
  return Run(config, tokenizer, model, mesh, tx, schedule, abstract, state_sharding, init_state,
             plan, load_teacher(config, mesh) if teacher else None, sources, pruner)


def loss_function(config: ml_collections.ConfigDict):
  """The weighted objectives of `config`, with their `objective_options`."""
  options = {k: dict(v) for k, v in config.get("objective_options", {}).items()}
  if "distill" in config.objectives:
    options["distill"] = dict(options.get("distill", {}), **distill_options(config))
  return objectives.combined(dict(config.objectives), options)


def delta_base(plan: Plan | None, base: dict, config) -> dict | None:
  """What a fine-tune's checkpoints may leave out: params loaded from the base and
  frozen for the whole run (None: save everything)."""
  if plan is None or config.finetune.get("save_frozen", False):
    return None
  frozen = {path_name(p) for p, on in
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
                         teacher_fn=run.teacher.fn if run.teacher else None,
                         stats_from=plan.stats_from(run.abstract.batch_stats)
                         if plan and run.abstract.batch_stats else None,
                         prune_fn=run.pruner)
  shardings = (run.state_sharding, parallel.batch_sharding(run.mesh))
  step = parallel.in_mesh(step, run.mesh)    # traced with the mesh: activation constraints
  if run.teacher is None:
    return jax.jit(step, in_shardings=shardings, out_shardings=(run.state_sharding, None),
                   donate_argnums=0)
  jitted = jax.jit(step, in_shardings=shardings + (run.teacher.sharding,),
                   out_shardings=(run.state_sharding, None), donate_argnums=0)
  return lambda state, batch: jitted(state, batch, run.teacher.params)


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
  host = jax.device_get(pending)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _check_finite(pending: list[dict], step: int, ckpt: io.Checkpointer) -> None:
  if not pending:
    return
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


def checkpointer(config, workdir) -> io.Checkpointer:
  return io.Checkpointer(workdir, keep=config.keep_checkpoints, base_loader=io.base_params)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          *, progress: bool = True) -> dict[str, float]:
  """Train `config` in `workdir`, resuming from its latest checkpoint if any.

  Returns the final metrics (eval metrics, steps, seconds, train throughput).
  """
  t0 = time.time()
  storage.check(workdir, "--workdir")    # a URL that does not answer fails here, in seconds
  workdir = storage.as_path(workdir)     # a local folder or a URL (gs://bucket/run)
  run = setup(config)
  c = run.config
  workdir.mkdir(parents=True, exist_ok=True)   # only once the config has passed its checks
  per_process = c.batch_size // jax.process_count()
  train_source = run.sources.get(c.data, "train")
  examples = train_examples(c, run.sources)     # in an epoch
  iterator = mmdata.make_iterator(c.data, "train", batch_size=per_process, train=True,
                                  tokenizer=run.tokenizer, source=train_source)
  ckpt = checkpointer(c, workdir)
  stopper = early_stopping(c, workdir, run.plan)
  start = 0
  if ckpt.latest_step() is not None:
    state, data_state, start = ckpt.restore(run.abstract)
    if "iterator" in data_state:
      iterator.set_state(data_state["iterator"])
    ckpt.base = data_state.get("base")       # a delta run stays a delta run
    stopper.load_state_dict(data_state.get("early_stop", {}))
    log.info("resumed from %s at step %d", ckpt.directory, start)
  else:
    state = run.state
    if c.get("init") and c.init.get("path"):
      params, stats, info = load_init(c, *jax.device_get((state.params, state.batch_stats)))
      state = state.replace(params=jax.device_put(params, run.state_sharding.params),
                            batch_stats=jax.device_put(stats, run.state_sharding.batch_stats))
      ckpt.base = delta_base(run.plan, info["base"], c)
  if run.plan is not None:
    n_train, n_all = run.plan.count(state.params)
    log.info("finetune %s: %d of %d params train (%.2f%%)", c.finetune.strategy, n_train,
             n_all, 100 * n_train / n_all)
  step_fn = make_step(run)
  writer = MetricWriter(workdir, resume_step=start)
  try:
    if jax.process_index() == 0:
      (workdir / "config.json").write_text(c.to_json_best_effort(indent=2))
      if run.tokenizer is not None:
        io.workdir.write_tokenizer(workdir, run.tokenizer)   # readers use the run's own one
      io.workdir.write_label_names(workdir, train_source.label_names)

    def evaluate_now(step, record=True):
      ctx = EvalContext(c, run.tokenizer,
                        Embedder(run.model, state.params, run.mesh, state.batch_stats),
                        workdir=workdir, sources=run.sources)
      metrics = run_evals(ctx, c.get("evals", {}))
      if record:
        writer.write(step, metrics, kind="eval")
      return metrics

    def data_state():
      return {"iterator": iterator.get_state(), "early_stop": stopper.state_dict()}

    stop = c.total_steps
    if c.get("stop_after", 0):
      stop = min(stop, start + c.stop_after)
    if stopper.stopped:
      log.info("%s stopped early at step %d (best step %s); nothing left to train", workdir,
               start, stopper.best_step)
      stop = start
    bar = tqdm(total=c.total_steps, initial=start, disable=not progress or jax.process_index(),
               unit="step", dynamic_ncols=True)
    pending, t_log = [], time.time()
    eval_metrics: dict[str, float] = {}
    timing = {"seconds": 0.0, "steps": 0}

    def flush(step):
      """Write the mean metrics of the steps since the last write."""
      nonlocal pending, t_log
      if not pending:
        return
      _check_finite(pending, step, ckpt)
      mean, n, dt = _mean_metrics(pending), len(pending), time.time() - t_log
      mean.update(steps_per_s=n / dt, images_per_s=n * c.batch_size / dt,
                  epoch=epochs.epoch_of(step, c, examples))
      rates = cost.rates(n / dt) if cost else {}   # tflops_per_device; mfu with a known peak
      mean.update(rates)
      if step > start + n:     # the first window includes compilation
        timing["seconds"] += dt
        timing["steps"] += n
      writer.write(step, mean)
      bar.set_postfix(epoch=f"{mean['epoch']:.1f}", loss=f"{mean['loss']:.3f}",
                      steps_s=f"{mean['steps_per_s']:.1f}",
                      img_s=f"{mean['images_per_s']:.0f}",
                      **{k.removesuffix("_per_device"): f"{v:.3g}" for k, v in rates.items()})
      pending, t_log = [], time.time()

    step, cost = start, None
    for step in range(start + 1, stop + 1):
      batch = parallel.device_batch(next(iterator), run.mesh)
      if cost is None:      # compiled here once for its FLOPs; the steps run this compilation
        step_fn, cost = mfu.compile_step(step_fn, c, state, batch)
      state, metrics = step_fn(state, batch)
      pending.append(metrics)
      bar.update(1)
      if step % c.log_every == 0 or step == stop:
        flush(step)
      if c.checkpoint_every and step % c.checkpoint_every == 0 and step != stop:
        _check_finite(pending, step, ckpt)
        ckpt.save(step, state, data_state(), c.to_json_best_effort())
      if c.eval_every and step % c.eval_every == 0 and step != stop:
        eval_metrics = evaluate_now(step)
        t_log = time.time()
        if stopper.update(step, eval_metrics, state.params, state.batch_stats):
          log.info("early stop at step %d: %s has not improved by > %g for %d evaluations "
                   "(best %.4f at step %d)", step, stopper.metric, stopper.min_delta,
                   stopper.patience, stopper.best, stopper.best_step)
          flush(step)
          stop = step
          break
    bar.close()
    at_end = stop == c.total_steps
    if at_end and not stopper.stopped:
      eval_metrics = evaluate_now(stop, record=stop > start)   # a rerun of a finished run: no row
      if stop > start:
        stopper.update(stop, eval_metrics, state.params, state.batch_stats)
    if stop > start:
      best = stopper.final_params(state.params, stop, at_end, state.batch_stats)
      if best is not None:
        state = state.replace(params=best[0], batch_stats=best[1])
        eval_metrics = evaluate_now(stop, record=False)    # the restored best (reports too)
      ckpt.save(stop, state, data_state(), c.to_json_best_effort())
    ckpt.wait()
    ckpt.close()
  except BaseException:    # a NaN stop, a failed eval, Ctrl-C: the rows so far still go
    writer.close_after_error()
    raise
  writer.close()
  result = dict(eval_metrics, steps=stop, seconds=round(time.time() - t0, 1), **stopper.result())
  stopper.close()
  if timing["steps"]:
    result["train_images_per_s"] = round(timing["steps"] * c.batch_size / timing["seconds"], 1)
  if jax.process_index() == 0:
    plot_run(workdir)
  return result


def finetune(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
             init: str | None = None, progress: bool = True) -> dict[str, float]:
  """`train` of `config`, starting from the checkpoint `init` (an mmjax workdir or a
  HF directory; default `config.init.path`). Resuming `workdir` ignores `init`."""
  config = copy.deepcopy(config)
  with config.unlocked():
    if "finetune" not in config:
      config.finetune = finetune_config()
    if "init" not in config:
      config.init = init_config()
    if init is not None:
      config.init.path = str(init)
  return train(config, workdir, progress=progress)


def restore(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
            step: int | None = None) -> tuple[Run, TrainState, int]:
  """The run built from `config` and the train state of `workdir`'s checkpoint."""
  storage.check(workdir, "--workdir")
  workdir = storage.as_path(workdir)
  if not (workdir / "checkpoints").is_dir():
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}: train first "
                            f"(mmjax train --workdir {workdir})")
  run = setup(config, teacher=False)
  ckpt = checkpointer(run.config, workdir)
  state, _, step = ckpt.restore(run.abstract, step)
  ckpt.close()
  return run, state, step


def evaluate(config: ml_collections.ConfigDict | None, workdir: str | pathlib.Path,
             step: int | None = None) -> dict[str, float]:
  """Run the evals of `config` (default: the workdir's own config) on the latest
  readable (or given) checkpoint of `workdir`. Reads params (and BatchNorm statistics)
  only: no optimizer state, no teacher, and nothing is written but the evaluators'
  reports."""
  storage.check(workdir, "--workdir")
  if config is None:   # (params=False: nothing touches JAX before `prepare` joins a pod)
    config = io.load(workdir, params=False, what="workdir").config
  elif (storage.as_path(workdir) / "config.json").is_file():
    # A quantized checkpoint (mmjax quantize) is read quantized whatever config evaluates it.
    config = keep_quantize(config, io.workdir.run_config_of(workdir))
  config = prepare(config, training=False)
  loaded = io.load(workdir, step, what="workdir")
  loaded.params = layers_layout.for_config(loaded.params, config)   # model.scan_layers
  # The data pipeline tokenizes captions even for an image-only model.
  tokenizer = loaded.tokenizer or mmdata.get_tokenizer(config.data)
  model = qat_model(build_model(config, tokenizer.vocab_size, special_ids(tokenizer)), config)
  mesh = parallel.make_mesh(config.get("mesh", {}))
  wanted = jax.eval_shape(_init_variables_fn(model, config, jax.random.PRNGKey(0)))  # shapes
  problems = "\n".join(filter(None, (
      tree_mismatch(shapes_by_name(loaded.params), shapes_by_name(wanted["params"])),
      tree_mismatch(shapes_by_name(loaded.batch_stats), shapes_by_name(wanted["batch_stats"])))))
  if problems:
    raise CheckpointMismatch(f"checkpoint {loaded.path} (step {loaded.step}) does not fit "
                             f"this model's params:\n{problems}")
  params = jax.device_put(loaded.params, parallel.shardings(
      parallel.config_specs(config, loaded.params, mesh), mesh))
  stats = jax.device_put(loaded.batch_stats, parallel.shardings(
      parallel.param_specs(loaded.batch_stats, [], mesh), mesh))      # replicated
  ctx = EvalContext(config, tokenizer, Embedder(model, params, mesh, stats),
                    workdir=storage.as_path(workdir))
  result = dict(run_evals(ctx, config.get("evals", {})), step=loaded.step)
  pruned = prune_options(config.get("finetune"))
  if pruned:     # the checkpoint's own zeros, not the configured target
    result.update(measured_sparsity(loaded.params, pruned["targets"]))
  return result
