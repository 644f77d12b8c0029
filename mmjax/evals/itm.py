"""Held-out image-text matching accuracy of the ITM head."""
from __future__ import annotations

import numpy as np

from mmjax.evals.context import EvalContext


def evaluate(ctx: EvalContext, ev) -> dict[str, float]:
  """Each image with its own caption (should match) and with another image's caption
  (should not; identical captions are left out)."""
  got = ctx.embedded(ev, match=True)
  neg = ~got["neg_same"]
  correct = np.concatenate([got["match_pos"] > 0.5, got["match_neg"][neg] <= 0.5])
  return {"acc": float(correct.mean()), "pos_acc": float((got["match_pos"] > 0.5).mean())}
