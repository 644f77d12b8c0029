"""Model FLOPs utilisation: FLOPs per train step over the device's peak bf16 FLOP/s.

The FLOPs of a step are XLA's own count of the compiled step (`cost_analysis()`: the
partitioned program of one device, so already per device). `analytic_flops` counts a
ViT + text-Transformer CLIP by hand (matmuls and attention, x3 for forward + backward) as
a cross-check: tests/test_mfu.py holds the two within 15% on a tiny model; the rest is
XLA also counting norms, activations, softmax and the optimizer update.

Two things make XLA's count differ from the model's: remat recomputes the forward pass
(XLA counts that work: hardware FLOPs, above model FLOPs), and `model.scan_layers` runs
the blocks in a while loop whose body XLA counts once. The loop logs both counts at the
first step; with scan, the analytic count (x depth) is the one to trust, and is used.
"""

from __future__ import annotations

import dataclasses
import logging

import jax

from mmjax.models.registry import tower_size

# Dense bf16 peak FLOP/s of one device (a chip; a GPU), by a lower-case substring of
# jax's `device_kind`, first match wins. Vendor figures without sparsity: TPU v4 275T,
# v5e 197T, v5p 459T, v6e (Trillium) 918T; A100 312T; H100 SXM 989T (PCIe 756T); H200 989T.
PEAK_BF16_FLOPS = (
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5", 459e12),                     # "TPU v5" and "TPU v5p"
    ("tpu v6 lite", 918e12), ("tpu v6", 918e12),
    ("a100", 312e12),
    ("h100 pcie", 756e12), ("h100", 989e12),
    ("h200", 989e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device of `device_kind`; None when unknown (CPUs and the
  rest: no MFU is reported)."""
  kind = device_kind.lower()
  return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)


def compiled_flops(compiled) -> float | None:
  """FLOPs of one run of a compiled program on one device, by XLA's cost analysis."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):     # older jax: one dict per program
    analysis = analysis[0] if analysis else {}
  flops = float((analysis or {}).get("flops", 0.0))
  return flops if flops > 0 else None


def _transformer_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  """Forward FLOPs of `depth` pre-LN blocks over `tokens` tokens (one example): q/k/v/out
  projections, the MLP, and the attention scores and mix (a multiply-add is 2 FLOPs)."""
  per_block = 2 * tokens * (4 * width * width + 2 * width * mlp_dim) + 4 * tokens**2 * width
  return depth * per_block


def analytic_flops(config, batch_size: int) -> float:
  """Training FLOPs of one global step (forward + backward = 3 x forward) of the image and
  text towers, their projections and the B x B contrastive logits. A fusion tower or a
  ResNet is not counted."""
  m, forward = config.model, 0.0
  embed_dim = m.get("embed_dim", 0)
  towers = 0
  if m.get("image") and m.image.get("type", "vit") == "vit":
    size = tower_size(m.image)
    patches = (config.data.image_size // size["patch"]) ** 2
    tokens = patches + (1 if m.image.get("pool", "cls") == "cls" else 0)
    forward += 2 * patches * size["patch"] ** 2 * 3 * size["width"]        # patch embedding
    forward += _transformer_flops(tokens, size["width"], size["depth"], size["mlp_dim"])
    forward += 2 * size["width"] * embed_dim
    towers += 1
  if m.get("text"):
    size = tower_size(m.text)
    forward += _transformer_flops(config.data.max_len, size["width"], size["depth"],
                                  size["mlp_dim"])
    forward += 2 * size["width"] * embed_dim
    towers += 1
  logits = 2 * batch_size * embed_dim * (batch_size if towers == 2 else 0)
  return 3 * (batch_size * forward + logits)


@dataclasses.dataclass(frozen=True)
class StepCost:
  """FLOPs of one train step on one device, and that device's peak (None: unknown)."""
  flops: float | None
  peak: float | None

  def rates(self, steps_per_s: float) -> dict[str, float]:
    """{'tflops_per_device', 'mfu'} at `steps_per_s`, each only when it is known."""
    if not self.flops:
      return {}
    out = {"tflops_per_device": self.flops * steps_per_s / 1e12}
    if self.peak:
      out["mfu"] = self.flops * steps_per_s / self.peak
    return out


def compile_step(step_fn, config, *args):
  """(the step compiled for `args`, its StepCost). Calling the compiled step afterwards
  reuses this one compilation. A step that is not a `jax.jit` function (one that closes
  over a distillation teacher) is returned as it is, without a cost."""
  peak = peak_flops(jax.devices()[0].device_kind)
  if not hasattr(step_fn, "lower"):
    return step_fn, StepCost(None, peak)
  compiled = step_fn.lower(*args).compile()
  flops = compiled_flops(compiled)
  analytic = analytic_flops(config, config.batch_size) / jax.device_count()
  logging.info("train step: %.4g FLOPs per device by XLA's cost analysis, %.4g by the "
               "analytic CLIP count", flops or 0.0, analytic)
  if config.model.get("scan_layers", False) and analytic:
    flops = analytic          # XLA counts a scanned loop's body once
  return compiled, StepCost(flops, peak)
