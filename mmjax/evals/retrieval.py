"""Image->text and text->image retrieval recall@K."""
from __future__ import annotations

import numpy as np

from mmjax.evals.context import EvalContext


def recall_at_k(sim: np.ndarray, positive: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
  """sim [Q, C] query-candidate scores; positive [Q, C] bool. A query counts as
  retrieved at K when any positive is among its top K candidates."""
  order = np.argsort(-sim, axis=1, kind="stable")
  hits = np.take_along_axis(positive, order, axis=1)
  first = np.where(hits.any(axis=1), hits.argmax(axis=1), sim.shape[1])
  return {f"r{k}": float((first < k).mean()) for k in ks}


def same_rows(ids: np.ndarray) -> np.ndarray:
  """[N, L] token ids -> [N, N] True where two captions are identical."""
  _, inverse = np.unique(ids, axis=0, return_inverse=True)
  inverse = inverse.reshape(-1)
  return inverse[:, None] == inverse[None, :]


def retrieval(embedded: dict[str, np.ndarray]) -> dict[str, float]:
  """Every held-out pair; a caption identical to the true one counts as a hit."""
  sim = embedded["image_emb"] @ embedded["text_emb"].T
  positive = same_rows(embedded["text"])
  out = {f"i2t_{k}": v for k, v in recall_at_k(sim, positive).items()}
  out.update({f"t2i_{k}": v for k, v in recall_at_k(sim.T, positive.T).items()})
  out["num_pairs"] = float(len(sim))
  return out


def evaluate(ctx: EvalContext, ev) -> dict[str, float]:
  return retrieval(ctx.embedded(ev))
