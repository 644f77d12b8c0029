"""Batch-level train-time augmentation on device: mixup and cutmix (`config.mix`).

TODO(helper): implement. Contract used by the loop: `batch_fn(config)` returns None
when `config.mix` is absent or off, else a jittable `fn(batch, rng) -> batch`.
"""
from __future__ import annotations


def batch_fn(config):
  if not config.get("mix"):
    return None
  raise NotImplementedError("config.mix")
