"""Mesh, sharding rules and tactics, multi-host plumbing.

The model never mentions devices. The mesh has three axes: the batch is split over
("data", "fsdp"); params are placed by (in this order)

1. `config.sharding_rules`: ((regex, spec), ...); the first whose regex matches a param's
   path name ("image_tower/encoder/block_0/mlp/fc1/kernel") gives its spec, dimension by
   dimension from the first (`()` replicates it);
2. the Megatron layout when the mesh's `model` axis is > 1 (tensor parallelism): q/k/v
   and MLP-in kernels split on their output (heads / hidden units), attention-out and
   MLP-out kernels on their input; dimensions count from the end, so a scanned stack of
   blocks (a leading layer axis) gets the same layout;
3. `config.sharding.tactic="fsdp"`: every param over `sharding.min_size_mb` is split on
   its largest dimension that the `fsdp` axis divides (and the Megatron layout left free);
   smaller ones, and integer leaves (step counters, RNG keys), are replicated.
   `"rules"`: only 1 and 2.

The same specs place the optimizer state, whose leaves end in their param's name.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mmjax.io.trees import path_name

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
BATCH_SPEC = P(BATCH_AXES)
TACTICS = ("rules", "fsdp")

# (regex on the path name, the dimension split over "model", counted from the end).
MEGATRON_LAYOUT = (
    (r"attn/(query|key|value)/(kernel|bias)$", -1),   # [D, H*K]: heads
    (r"mlp/fc1/(kernel|bias)$", -1),                  # [D, M]: hidden units
    (r"attn/out/kernel$", -2),                        # [H*K, D]: heads
    (r"mlp/fc2/kernel$", -2),                         # [M, D]: hidden units
)


def maybe_initialize_distributed(cfg) -> None:
  """Join a multi-process runtime when the config (or the TPU/cluster env) asks.

  `cfg.distributed.coordinator` ("host:port"), `num_processes`, `process_id`;
  on TPU VMs and SLURM clusters `auto=True` lets JAX discover all of them.
  """
  d = cfg.get("distributed")
  if not d or jax.distributed.is_initialized():
    return
  if d.get("coordinator"):
    jax.distributed.initialize(coordinator_address=d.coordinator,
                               num_processes=d.num_processes, process_id=d.process_id)
  elif d.get("auto", False):
    jax.distributed.initialize()


def make_mesh(mesh_cfg: Mapping[str, int] | None = None, devices=None) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "model") mesh; one size may be -1 (all remaining devices), and
  axes left out have size 1."""
  devices = list(devices if devices is not None else jax.devices())
  mesh_cfg = dict(mesh_cfg or {"data": -1})
  unknown = set(mesh_cfg) - set(AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} unknown; mmjax meshes have {AXES}")
  sizes = [mesh_cfg.get(a, 1) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {mesh_cfg}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes and len(devices) % known:
    raise ValueError(f"mesh {mesh_cfg}: the fixed axes ({known} devices) do not divide the "
                     f"{len(devices)} devices present")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices; "
                     f"{len(devices)} are present")
  if devices == list(jax.devices()):
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES))
  return jax.sharding.Mesh(np.array(devices).reshape(sizes), AXES)


def _axis_size(mesh, axis: str | Sequence[str] | None) -> int:
  axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
  return int(np.prod([mesh.shape[a] for a in axes]))


def _ruled(name: str, shape: tuple[int, ...], pattern: str, spec: tuple, mesh) -> P:
  if len(spec) > len(shape):
    raise ValueError(f"sharding rule {pattern!r} gives {spec} to {name} of shape {shape}")
  for i, (dim, axis) in enumerate(zip(shape, spec)):
    if dim % _axis_size(mesh, axis):
      raise ValueError(f"sharding rule {pattern!r}: {name} {shape}: dim {i} (size {dim}) "
                       f"not divisible by mesh axis {axis!r} of size {_axis_size(mesh, axis)}")
  return P(*spec)


def _megatron(name: str, shape: tuple[int, ...], mesh) -> list[str | None]:
  spec = [None] * len(shape)
  size = mesh.shape.get("model", 1)
  if size == 1:
    return spec
  for pattern, dim in MEGATRON_LAYOUT:
    if re.search(pattern, name) and len(shape) >= -dim:
      i = len(shape) + dim
      if shape[i] % size:
        raise ValueError(f"tensor parallelism: {name} {shape}: dim {i} (size {shape[i]}) "
                         f"not divisible by mesh axis 'model' of size {size}")
      spec[i] = "model"
      break
  return spec


def _fsdp(name: str, shape: tuple[int, ...], nbytes: int, spec: list, mesh,
          min_size_mb: float) -> list[str | None]:
  size = mesh.shape.get("fsdp", 1)
  if size == 1 or not shape or nbytes <= min_size_mb * 2**20:
    return spec
  free = [i for i, d in enumerate(shape) if spec[i] is None and d % size == 0]
  if not free and any(spec):
    return spec                       # split over `model` already: left as it is
  if not free:
    raise ValueError(f"sharding tactic 'fsdp': {name} {shape} ({nbytes / 2**20:.2f} MB > "
                     f"sharding.min_size_mb={min_size_mb:g}) has no free dimension divisible "
                     f"by mesh axis 'fsdp' of size {size}; add a sharding rule for it or "
                     f"raise sharding.min_size_mb")
  best = max(free, key=lambda i: (shape[i], -i))       # the largest; the first of equals
  return [("fsdp" if i == best else a) for i, a in enumerate(spec)]


def param_specs(tree: Any, rules: Sequence[tuple[str, Sequence[str | None]]],
                mesh: jax.sharding.Mesh, *, tactic: str = "rules",
                min_size_mb: float = 4.0) -> Any:
  """A PartitionSpec per leaf of `tree` (arrays or ShapeDtypeStructs): a matching rule's,
  else the Megatron layout and the tactic's (see the module docstring). A dimension that
  its mesh axis does not divide is a ValueError naming the param, the dimension and the
  axis."""
  if tactic not in TACTICS:
    raise ValueError(f"sharding.tactic={tactic!r}: expected one of {TACTICS}")
  compiled = [(re.compile(pattern), tuple(spec)) for pattern, spec in rules]

  def spec_for(path, leaf):
    name, shape = path_name(path), tuple(leaf.shape)
    for pattern, spec in compiled:
      if pattern.search(name):
        return _ruled(name, shape, pattern.pattern, spec, mesh)
    spec = _megatron(name, shape, mesh)
    if tactic == "fsdp" and jnp.issubdtype(leaf.dtype, jnp.floating):
      nbytes = int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
      spec = _fsdp(name, shape, nbytes, spec, mesh, min_size_mb)
    while spec and spec[-1] is None:
      spec.pop()
    return P(*spec)

  return jax.tree_util.tree_map_with_path(spec_for, tree)


def config_specs(config, tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """`param_specs` of `tree` under `config.sharding_rules` and `config.sharding` (a
  workdir's config from before `sharding` existed: rules only)."""
  options = dict(config.get("sharding") or {})
  return param_specs(tree, [tuple(r) for r in config.get("sharding_rules", ())], mesh,
                     **options)


def shardings(specs: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def in_mesh(fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """`fn` traced with `mesh` as the active (abstract) mesh, which the model's activation
  constraints (models/dense.py `constrain`) and the chunked losses' shard_map read.
  Wrap the function that `jax.jit` traces, not the jitted one."""

  def call(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return call


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def device_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded over the batch axes (replicated over
  `model`).

  Each process passes its own slice; strings (captions) stay on the host.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
