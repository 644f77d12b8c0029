"""Param trees by name: "a/b/kernel" paths, shapes, mismatch reports, partial trees.

Every loader (Orbax checkpoints, Hugging Face directories, fine-tune inits) and
the sharding rules speak of params by these names.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import traverse_util


class CheckpointMismatch(ValueError):
  """A checkpoint that does not fit the model it is loaded into; the message lists keys."""


def path_name(path) -> str:
  """A pytree key path as "a/b/kernel"."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def flat(tree: Any) -> dict[str, Any]:
  """{"a/b/kernel": leaf} of a nested dict."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflat(named: dict[str, Any]) -> dict:
  """The nested dict of {"a/b/kernel": leaf}."""
  return traverse_util.unflatten_dict(named, sep="/")


def shapes_by_name(tree: Any) -> dict[str, tuple[int, ...]]:
  """{"a/b/kernel": shape} for every array (or array metadata) leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_name(p): tuple(leaf.shape) for p, leaf in leaves}


def tree_mismatch(saved: dict[str, tuple], wanted: dict[str, tuple], limit: int = 20) -> str:
  """A readable list of missing, unexpected and mis-shaped keys ('' if none)."""
  missing = sorted(set(wanted) - set(saved))
  unexpected = sorted(set(saved) - set(wanted))
  shaped = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
  parts = []
  for title, keys, fmt in (
      ("missing (in the model, not the checkpoint)", missing, lambda k: k),
      ("unexpected (in the checkpoint, not the model)", unexpected, lambda k: k),
      ("mis-shaped", shaped, lambda k: f"{k}: checkpoint {saved[k]} vs model {wanted[k]}")):
    if keys:
      more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
      parts.append(f"  {title}: {len(keys)}\n" +
                   "\n".join(f"    {fmt(k)}" for k in keys[:limit]) + more)
  return "\n".join(parts)


def drop_params(params: Any, names) -> Any:
  """`params` without the leaves named in `names` ("a/b/kernel"; emptied dicts go too)."""
  names = set(names)
  return traverse_util.unflatten_dict({k: v for k, v in flat(params).items() if k not in names},
                                      sep="/")


def fill_params(saved: Any, base: dict[str, np.ndarray], like: Any = None) -> Any:
  """`saved` params with the leaves they lack taken from `base` ({name: array}); with
  `like` (the full params, arrays or ShapeDtypeStructs), in its structure, dtypes and
  shardings."""
  have = dict(flat(saved))
  if like is None:
    have.update({k: v for k, v in base.items() if k not in have})
    return traverse_util.unflatten_dict(have, sep="/")

  def pick(path, leaf):
    name = path_name(path)
    if name in have:
      return have[name]
    if isinstance(base[name], jax.Array):     # already on device (e.g. the live params)
      return base[name]
    value = np.asarray(base[name], leaf.dtype)
    sharding = getattr(leaf, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else value

  return jax.tree_util.tree_map_with_path(pick, like)
