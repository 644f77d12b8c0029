"""What every evaluator gets: the config, the tokenizer, an embedder of the current
params, the run's built data sources, and caches shared across evaluators."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax import data as mmdata
from mmjax.evals.embed import Embedder


@dataclasses.dataclass
class EvalContext:
  config: ml_collections.ConfigDict
  tokenizer: Any
  embedder: Embedder
  cache: dict = dataclasses.field(default_factory=dict)
  workdir: pathlib.Path | None = None   # where evaluators write files (None: nowhere);
  # an etils.epath.Path for a remote workdir (gs://...): the same calls write there
  name: str = ""                        # the evaluator being run (config.evals key)
  # Built data sources, one per (split, data config). The train loop passes the run's
  # own, so a user's files are read and validated once per run, not once per use.
  sources: mmdata.Sources = dataclasses.field(default_factory=mmdata.Sources)

  def data_config(self, ev) -> ml_collections.ConfigDict:
    cfg = copy.deepcopy(self.config.data)
    with cfg.unlocked():
      for k, v in ev.get("data", {}).items():
        cfg[k] = v
    return cfg

  def source(self, ev, split: str | None = None):
    return self.sources.get(self.data_config(ev), split or ev.get("split", "test"))

  def batches(self, ev, split: str | None = None):
    """One unshuffled pass over `split` (default ev.split), padded to whole batches."""
    split = split or ev.get("split", "test")
    batch_size = self.config.get("eval_batch_size", 256) // jax.process_count()
    return mmdata.make_iterator(self.data_config(ev), split, batch_size=batch_size,
                                train=False, tokenizer=self.tokenizer,
                                source=self.source(ev, split))

  @staticmethod
  def positions(batch_index: int, rows: int) -> np.ndarray:
    """Where the `rows` rows of this process's batch `batch_index` of `batches` sit in the
    padded split. The pipeline deals examples round-robin to the processes and batches each
    one's share, so global batch b holds positions [b * G, (b + 1) * G) (G: rows x
    processes) on any number of processes."""
    local = batch_index * rows + np.arange(rows)
    return (local * jax.process_count() + jax.process_index()).astype(np.int32)

  def classnames(self, ev, label: str) -> list[str]:
    return list(ev.get("classnames", ())) or list(self.source(ev).label_names[label])

  def embedded(self, ev, match: bool = False, split: str | None = None,
               limit: int = 0) -> dict[str, np.ndarray]:
    """Embeddings of `split` (default ev.split), its first `limit` batches' worth
    of examples when limit > 0; cached per split, data config and options."""
    split = split or ev.get("split", "test")
    key = (split, self.data_config(ev).to_json(), match, limit)
    if key not in self.cache:
      batches = self.batches(ev, split)
      if limit:
        batches = itertools.islice(batches, -(-limit // self.config.get("eval_batch_size", 256)))
      self.cache[key] = self.embedder.split(batches, match=match)
    return self.cache[key]
