"""Knowledge distillation: a frozen teacher's outputs in the student's train step.

TODO(helper): implement. Contract used by the loop: `load_teacher(config, mesh)`
returns None when `config.distill` is absent, else a `Teacher`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass
class Teacher:
  fn: Callable           # (params, batch) -> {name: array}; the student's loss sees teacher_<name>
  params: Any            # placed on the mesh (replicated or sharded)
  sharding: Any          # of params


def load_teacher(config, mesh) -> Teacher | None:
  if not config.get("distill"):
    return None
  raise NotImplementedError("config.distill")
