"""Magnitude pruning as a fine-tune option (optax has none).

  config.finetune.prune = dict(sparsity=0.5, schedule="gradual", scope="global",
                               targets=r"/encoder/.*/kernel$", begin_step=0, end_step=0)

The params whose path name matches `targets` are pruned by magnitude: a boolean mask per
param, kept in the train state (`TrainState.masks`, saved with it), applied inside the
jitted step after every update, so a pruned weight is exactly 0 from then on and the
checkpoint stores the zeros.

schedule "gradual" (Zhu & Gupta 2017, "To prune, or not to prune"): from `begin_step` to
  `end_step` (0: the run's last step) the target sparsity rises as
  s(t) = sparsity * (1 - (1 - (t - begin) / (end - begin)) ** 3), and the masks are
  recomputed from the weights' magnitudes at every step of the ramp; after it they are
  held. Weights pruned once are 0, the smallest magnitude, so they stay pruned.
schedule "oneshot": at `begin_step` the masks prune `sparsity` at once, then are held.
scope "global": one ranking over all targeted weights (layers lose different fractions);
  "layer": each targeted param loses exactly round(s * size) of its weights.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.io.trees import flat, path_name, unflat

DEFAULTS = dict(sparsity=0.0, schedule="gradual", scope="global",
                targets=r"/encoder/.*/kernel$", begin_step=0, end_step=0)
SCHEDULES = ("gradual", "oneshot")
SCOPES = ("global", "layer")


def options(ft) -> dict[str, Any]:
  """config.finetune.prune with its defaults ({} when absent or sparsity 0: no pruning)."""
  given = (ft or {}).get("prune") or {}
  given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"finetune.prune has unknown keys {unknown}; known: {sorted(DEFAULTS)}")
  opts = {**DEFAULTS, **given}
  return opts if opts["sparsity"] > 0 else {}


def _ranks(x: jax.Array) -> jax.Array:
  """The rank of each element of 1-D `x` in ascending order (ties: lower index first)."""
  order = jnp.argsort(x, stable=True)
  return jnp.zeros(x.shape, jnp.int32).at[order].set(jnp.arange(x.size, dtype=jnp.int32))


def _keep(magnitude: jax.Array, sparsity: jax.Array) -> jax.Array:
  """Bool [N]: False for the round(sparsity * N) smallest of 1-D `magnitude`."""
  pruned = jnp.round(sparsity * magnitude.size).astype(jnp.int32)
  return _ranks(magnitude) >= pruned


@dataclasses.dataclass(frozen=True)
class Pruner:
  """Masks and their schedule for one run (see the module doc)."""
  sparsity: float
  schedule: str
  scope: str
  targets: str
  begin_step: int
  end_step: int            # resolved: > begin_step for "gradual"

  @classmethod
  def from_config(cls, ft, total_steps: int) -> "Pruner | None":
    """The pruner of config.finetune (None without pruning)."""
    o = options(ft)
    if not o:
      return None
    if not 0.0 < o["sparsity"] < 1.0:
      raise ValueError(f"finetune.prune.sparsity={o['sparsity']}: expected 0 <= s < 1")
    if o["schedule"] not in SCHEDULES or o["scope"] not in SCOPES:
      raise ValueError(f"finetune.prune: schedule {o['schedule']!r} (one of {SCHEDULES}), "
                       f"scope {o['scope']!r} (one of {SCOPES})")
    begin = max(int(o["begin_step"]), 1)      # the first step that can update a mask is 1
    end = int(o["end_step"]) or total_steps
    if o["schedule"] == "gradual" and end <= begin:
      raise ValueError(f"finetune.prune: end_step={end} must be after begin_step={begin} "
                       f"for the gradual schedule")
    return cls(float(o["sparsity"]), o["schedule"], o["scope"], o["targets"], begin, end)

  def names(self, params) -> list[str]:
    """The targeted params' path names (params may be abstract); an error when `targets`
    matches none."""
    rx = re.compile(self.targets)
    names = sorted(name for name in flat(params) if rx.search(name))
    if not names:
      raise ValueError(f"finetune.prune.targets={self.targets!r} matches no param (names "
                       f"look like {sorted(flat(params))[:3]})")
    return names

  def init_masks(self, params) -> dict:
    """All-True masks (nested like params, targeted leaves only)."""
    names = self.names(params)
    leaves = flat(params)
    return unflat({n: jnp.ones(leaves[n].shape, bool) for n in names})

  def sparsity_at(self, step: jax.Array) -> jax.Array:
    """The target sparsity after `step` updates (float32 scalar)."""
    step = jnp.asarray(step, jnp.float32)
    if self.schedule == "oneshot":
      return jnp.where(step >= self.begin_step, self.sparsity, 0.0)
    t = jnp.clip((step - self.begin_step) / (self.end_step - self.begin_step), 0.0, 1.0)
    return jnp.where(step >= self.begin_step, self.sparsity * (1 - (1 - t) ** 3), 0.0)

  def _updating(self, step: jax.Array) -> jax.Array:
    last = self.begin_step if self.schedule == "oneshot" else self.end_step
    return (step >= self.begin_step) & (step <= last)

  def new_masks(self, params, sparsity: jax.Array) -> dict:
    """Masks that prune `sparsity` of the targeted weights of `params` by magnitude."""
    leaves = flat(params)
    names = self.names(params)
    mags = [jnp.abs(leaves[n]).ravel() for n in names]
    if self.scope == "layer":
      keep = [_keep(m, sparsity) for m in mags]
    else:
      together = _keep(jnp.concatenate(mags), sparsity)
      keep = jnp.split(together, np.cumsum([m.size for m in mags])[:-1])
    return unflat({n: k.reshape(leaves[n].shape) for n, k in zip(names, keep)})

  def __call__(self, params, masks, step: jax.Array) -> tuple[Any, dict]:
    """(params with the masks applied, the masks) after update number `step`; inside jit."""
    masks = jax.lax.cond(self._updating(step),
                         lambda: self.new_masks(params, self.sparsity_at(step)),
                         lambda: masks)
    return apply_masks(params, masks), masks


def apply_masks(params, masks) -> Any:
  """`params` with every masked-out weight set to exactly 0."""
  keep = flat(masks)
  return jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.where(keep[path_name(path)], p, 0).astype(p.dtype)
      if path_name(path) in keep else p, params)


def measured_sparsity(params, targets: str) -> dict[str, float]:
  """The fraction of exact zeros among the params matching `targets`, and among all
  params (what `mmjax eval` reports for a pruned run). In a quantized checkpoint a kernel
  counts by its int8 values (a pruned 0 stays 0); the scales are left out."""
  rx = re.compile(targets)
  zeros = total = zeros_all = total_all = 0
  for name, p in flat(params).items():
    if name.endswith("/array/scale") or "_lhs_scale/" in name:
      continue
    name = name.removesuffix("/array/qvalue")
    p = np.asarray(p)
    z = int(p.size - np.count_nonzero(p))
    zeros_all, total_all = zeros_all + z, total_all + p.size
    if rx.search(name):
      zeros, total = zeros + z, total + p.size
  return {"prune_sparsity": zeros / max(total, 1), "params_sparsity": zeros_all / total_all}
