"""Bytes from every process: the one way host-local Python values (strings, JSON) travel
between the processes of a multi-host run.

Here in data/ (layer 1), the lowest layer that needs it: the pipeline's per-process
iterator states are gathered with it, and the evaluators above (evals/) gather rows too.
"""
from __future__ import annotations

from typing import Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils


def allgather_bytes(items: Iterable[bytes]) -> list[list[bytes]]:
  """Every process's `items`, in process order, on every process: [process][item].

  A collective: every process calls it at the same point of its program. The processes
  may pass different numbers of items, of any lengths (0 included). On one process it is
  the identity, with no communication: `[list(items)]`.

  The items travel as one uint8 array [count, width] per process, padded to the most
  items and the longest item on any process, with each item's length (-1: no item).
  """
  items = [bytes(b) for b in items]
  if jax.process_count() == 1:
    return [items]
  local = np.array([len(items), max(map(len, items), default=0)], np.int32)
  # At least one row and one column: a zero-size array is not gathered the same way.
  count, width = np.maximum(np.asarray(multihost_utils.process_allgather(local)).max(0), 1)
  raw = np.zeros((count, width), np.uint8)
  lengths = np.full(count, -1, np.int32)
  for row, b in enumerate(items):
    raw[row, :len(b)] = np.frombuffer(b, np.uint8)
    lengths[row] = len(b)
  raw, lengths = map(np.asarray, multihost_utils.process_allgather((raw, lengths)))
  # raw: [P, count, width]; lengths: [P, count]
  return [[r[:n].tobytes() for r, n in zip(rows, sizes) if n >= 0]
          for rows, sizes in zip(raw, lengths)]
