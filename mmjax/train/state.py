"""The train state: one pytree, saved and restored whole."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array         # raw uint32 key; per-step keys are fold_in(rng, step)
