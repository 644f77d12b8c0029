"""Batch-level train-time augmentation on device: mixup and cutmix (`config.mix`).

`batch_fn(config)` is None when `config.mix` is absent or off, else a jittable
`fn(batch, rng) -> batch` that the train step applies before the model. Row i is
mixed with row i - 1 (the batch rolled by one; batches are shuffled), with one
weight `lam` per batch, and `batch["mix_lam"]` [B] tells the `classify` objective
how much of each row's target is its own label (see objectives.classify).

  config.mix = dict(mixup=0.2,        # Beta(alpha, alpha) of mixup's lam; 0 = off
                    cutmix=1.0,       # Beta(alpha, alpha) of cutmix's lam; 0 = off
                    prob=1.0,         # chance that a batch is mixed at all
                    switch_prob=0.5)  # with both on: chance of cutmix rather than mixup
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

DEFAULTS = dict(mixup=0.0, cutmix=0.0, prob=1.0, switch_prob=0.5)


def options(config) -> dict[str, float]:
  """`config.mix` checked and filled in from DEFAULTS (all off when absent)."""
  mix = dict(config.get("mix") or {})
  unknown = sorted(set(mix) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown key {', '.join('config.mix.' + k for k in unknown)}; "
                     f"known: {sorted(DEFAULTS)}")
  mix = dict(DEFAULTS, **mix)
  for key, value in mix.items():
    is_prob = key in ("prob", "switch_prob")
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
        or (is_prob and value > 1)):
      raise ValueError(f"config.mix.{key}={value!r}: expected "
                       + ("a probability in [0, 1]" if is_prob else "a Beta alpha >= 0 (0 = off)"))
  return {k: float(v) for k, v in mix.items()}


def batch_fn(config) -> Callable | None:
  """The mixing transform of `config.mix`, or None when it is absent or off."""
  mix = options(config)
  if (mix["mixup"] == 0 and mix["cutmix"] == 0) or mix["prob"] == 0:
    return None
  objectives = sorted(config.get("objectives", {}))
  if "classify" not in objectives:
    raise ValueError(f"config.mix is on but config.objectives {objectives} has "
                     "no 'classify': mixing blends labels, so it only makes sense for a "
                     "classifier")
  return lambda batch, rng: mix_batch(batch, rng, **mix)


def mix_batch(batch: dict, rng: jax.Array, *, mixup: float, cutmix: float, prob: float,
              switch_prob: float) -> dict:
  """`batch` with its images mixed (mixup or cutmix, chosen per batch) and `mix_lam` [B] added."""
  k_mix, k_switch, k_lam, k_box = jax.random.split(rng, 4)
  images = batch["image"]                                            # [B, H, W, C]
  partner = jnp.roll(images, 1, axis=0)                              # row i holds row i - 1
  if mixup > 0 and cutmix > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix > 0)
  alpha = jnp.where(use_cutmix, cutmix, mixup)
  lam = jax.random.beta(k_lam, alpha, alpha)
  lam = jnp.where(jax.random.uniform(k_mix) < prob, lam, 1.0)      # 1: this batch unmixed
  mask, cut_lam = cutmix_mask(k_box, images.shape[1], images.shape[2], lam)
  mixed = jnp.where(use_cutmix, jnp.where(mask[None, :, :, None], partner, images),
                    lam * images + (1 - lam) * partner)
  lam = jnp.where(use_cutmix, cut_lam, lam)
  return dict(batch, image=mixed.astype(images.dtype),
              mix_lam=jnp.full(images.shape[:1], lam, jnp.float32))


def cutmix_mask(rng: jax.Array, height: int, width: int, lam: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """A box of area (1 - lam) of the image, centred at a uniform random pixel and clipped
  to the image: (bool [H, W], True inside; the lam that the clipped box really leaves)."""
  cut = jnp.sqrt(1 - lam)
  cy, cx = jax.random.uniform(rng, (2,)) * jnp.array([height, width])
  y0, y1 = (jnp.clip(jnp.round(cy + s * cut * height / 2), 0, height) for s in (-1, 1))
  x0, x1 = (jnp.clip(jnp.round(cx + s * cut * width / 2), 0, width) for s in (-1, 1))
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  return mask, 1 - mask.mean(dtype=jnp.float32)
