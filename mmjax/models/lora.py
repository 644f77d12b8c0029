"""Folding LoRA updates into the base weights, for export and serving.

A Dense with LoRA computes x W + (alpha / r) x A B, so W' = W + (alpha / r) A B
gives the same outputs with no extra params: `merge_lora(params, alpha)` returns
params for the same config with `finetune.lora_rank = 0`.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def merge_lora(params: Any, alpha: float) -> Any:
  """A copy of `params` with every {kernel, lora_a, lora_b} folded into kernel."""
  if not isinstance(params, dict):
    return params
  out = {k: merge_lora(v, alpha) for k, v in params.items() if k not in ("lora_a", "lora_b")}
  if "lora_a" in params:
    a, b = params["lora_a"], params["lora_b"]         # [(L,) I, r], [(L,) r, O]
    # matmul, not dot: a scanned stack's (model.scan_layers) per-layer products.
    delta = (alpha / a.shape[-1]) * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
    out["kernel"] = (params["kernel"].astype(jnp.float32) + delta).astype(params["kernel"].dtype)
  return out
