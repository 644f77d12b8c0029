"""Jitted inference over a held-out split: embeddings and match scores."""
from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax import parallel
from mmjax.data.hosts import allgather_bytes
from mmjax.models import variables


def to_host(x: jax.Array) -> np.ndarray:
  """A global (possibly multi-host) array -> the full numpy array on every host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_rows(columns: dict[str, Any]) -> dict[str, np.ndarray]:
  """Host-local columns (numbers or strings, [N, ...]) -> every process's rows, concatenated
  in process order, on every process. Every process passes the same keys and N.

  Strings travel as UTF-8 bytes (`allgather_bytes`), every text column in one gather.
  """
  columns = {k: np.asarray(v) for k, v in columns.items()}
  if jax.process_count() == 1:
    return columns
  text = [k for k, v in columns.items() if v.dtype.kind in "UO"]    # str, or str objects
  arrays = {k: v for k, v in columns.items() if k not in text}
  got = jax.tree.map(np.asarray, multihost_utils.process_allgather(arrays, tiled=True))
  if text:
    # Per process: its first text column's N strings, then the next column's, ...
    per_process = allgather_bytes([s.encode() for k in text for s in columns[k].tolist()])
    n = len(columns[text[0]])
    for i, k in enumerate(text):
      got[k] = np.array([b.decode() for items in per_process for b in items[i * n:(i + 1) * n]],
                        np.str_)
  return got


def pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  extra = (-len(x)) % multiple
  return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x


class Embedder:
  """The model's inference functions, jitted once for a params/mesh pair. BatchNorm
  normalises with `batch_stats`, the running statistics."""

  def __init__(self, model, params: Any, mesh: jax.sharding.Mesh, batch_stats: Any = None):
    self.model, self.params, self.mesh = model, params, mesh
    self.variables = variables(params, batch_stats)

  @functools.cached_property
  def _image_fn(self):
    return jax.jit(lambda v, x: self.model.apply(v, x, method=self.model.encode_image)[0])

  @functools.cached_property
  def _text_fn(self):
    return jax.jit(lambda v, ids, m: self.model.apply(v, ids, m,
                                                      method=self.model.encode_text)[0])

  @functools.cached_property
  def _match_fn(self):
    def match(v, image, ids, mask):
      def f(module):
        _, img = module.encode_image(image)
        _, txt = module.encode_text(ids, mask)
        return module.match_logits(img["tokens"], txt["tokens"], mask)
      return jax.nn.softmax(self.model.apply(v, method=f), axis=-1)[:, 1]
    return jax.jit(match)

  @functools.cached_property
  def _classify_fn(self):
    return jax.jit(lambda v, batch: self.model.apply(v, batch, method=self.model.classify))

  def classify(self, batches: Iterable[dict[str, np.ndarray]], label: str
               ) -> dict[str, np.ndarray]:
    """Class logits [N, C] and the integer `label` [N] of every valid example (a token
    classifier's: logits [N, L, C] and token labels [N, L])."""
    logits, labels = [], []
    for batch in batches:
      g = parallel.device_batch(batch, self.mesh)
      inputs = {k: g[k] for k in ("image", "text", "text_mask") if k in g}  # text-only data
      logits.append(to_host(self._classify_fn(self.variables, inputs)))
      labels.append(to_host(g[label]))
      if "valid" in g:
        keep = to_host(g["valid"]) > 0
        logits[-1], labels[-1] = logits[-1][keep], labels[-1][keep]
    return {"logits": np.concatenate(logits), label: np.concatenate(labels)}

  def _global(self, **arrays):
    return parallel.device_batch(arrays, self.mesh).values()

  def texts(self, ids: np.ndarray, mask: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Unit text embeddings [N, E] for host token arrays (same on every host)."""
    n = len(ids)
    out = []
    step = max(batch_size // jax.device_count(), 1) * jax.device_count()
    for i in range(0, n, step):
      chunk_ids = pad_rows(ids[i:i + step], jax.device_count())
      chunk_mask = pad_rows(mask[i:i + step], jax.device_count())
      sharding = parallel.batch_sharding(self.mesh)
      g_ids, g_mask = (jax.device_put(a, sharding) for a in (chunk_ids, chunk_mask))
      out.append(to_host(self._text_fn(self.variables, g_ids, g_mask)))
    return np.concatenate(out)[:n]

  def split(self, batches: Iterable[dict[str, np.ndarray]], *, match: bool = False,
            negative_shift: int = 1) -> dict[str, np.ndarray]:
    """Embed every valid example of an eval iterator.

    Returns image_emb, text_emb [N, E], text ids [N, L], every integer label,
    and with `match`, ITM probabilities for the true pairs (`match_pos`) and for
    each image with the text `negative_shift` rows away in its batch (`match_neg`,
    `neg_same`: True where that text happens to be identical).
    """
    cols: dict[str, list[np.ndarray]] = {}
    for batch in batches:
      g = parallel.device_batch(batch, self.mesh)
      got = {"image_emb": self._image_fn(self.variables, g["image"]),
             "text_emb": self._text_fn(self.variables, g["text"], g["text_mask"])}
      if match:
        got["match_pos"] = self._match_fn(self.variables, g["image"], g["text"], g["text_mask"])
        rolled = {k: np.roll(batch[k], negative_shift, axis=0) for k in ("text", "text_mask")}
        gr = parallel.device_batch(rolled, self.mesh)
        got["match_neg"] = self._match_fn(self.variables, g["image"], gr["text"], gr["text_mask"])
        got["neg_same"] = (g["text"] == gr["text"]).all(axis=1)
      for k, v in g.items():
        if k not in ("image", "text_mask"):
          got[k] = v
      for k, v in got.items():
        cols.setdefault(k, []).append(to_host(v))
    data = {k: np.concatenate(v) for k, v in cols.items()}
    valid = data.pop("valid", np.ones(len(data["image_emb"]))) > 0
    return {k: v[valid] for k, v in data.items()}
