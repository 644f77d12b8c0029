"""Mesh, sharding rules and multi-host plumbing.

The model never mentions devices: params are placed by regex rules from the
config, the batch is split over every device along ("data", "fsdp").
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mmjax.io.trees import path_name

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)


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
  """A ("data", "fsdp") mesh; one size may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  mesh_cfg = dict(mesh_cfg or {"data": -1, "fsdp": 1})
  unknown = set(mesh_cfg) - set(AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} unknown; mmjax meshes have {AXES}")
  sizes = [mesh_cfg.get(a, 1) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {mesh_cfg}")
  known = int(np.prod([s for s in sizes if s != -1]))
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices; "
                     f"{len(devices)} are present")
  if devices == list(jax.devices()):
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES))
  return jax.sharding.Mesh(np.array(devices).reshape(sizes), AXES)


def param_specs(params: Any, rules: Sequence[tuple[str, Sequence[str | None]]],
                mesh: jax.sharding.Mesh) -> Any:
  """PartitionSpec per leaf: the first rule whose regex matches the param's path
  name; unmatched params are replicated. A dimension that the mesh axis does
  not divide is an error naming the param."""
  compiled = [(re.compile(pattern), tuple(spec)) for pattern, spec in rules]

  def spec_for(path, leaf):
    name = path_name(path)
    for pattern, spec in compiled:
      if pattern.search(name):
        if len(spec) > leaf.ndim:
          raise ValueError(f"sharding rule {pattern.pattern!r} gives {spec} to {name} "
                           f"of shape {leaf.shape}")
        for dim, axis in zip(leaf.shape, spec):
          size = mesh.shape[axis] if axis else 1
          if dim % size:
            raise ValueError(f"{name} {leaf.shape}: dim {dim} not divisible by mesh axis "
                             f"{axis!r} of size {size}")
        return P(*spec)
    return P()

  return jax.tree_util.tree_map_with_path(spec_for, params)


def shardings(specs: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def device_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded over the batch axes.

  Each process passes its own slice; strings (captions) stay on the host.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
