"""Linear-probe accuracy: a logistic regression on frozen image embeddings."""
from __future__ import annotations

from mmjax.evals.context import EvalContext


def evaluate(ctx: EvalContext, ev) -> dict[str, float]:
  """Fit on `ev.train_examples` of the train split, score on `ev.split`."""
  # Only this evaluator needs scikit-learn, a slow import.
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  train = ctx.embedded(ev, split=ev.get("train_split", "train"),
                       limit=ev.get("train_examples", 2048))
  test = ctx.embedded(ev)
  probe = make_pipeline(StandardScaler(), LogisticRegression(C=ev.get("C", 1.0), max_iter=2000))
  probe.fit(train["image_emb"], train[ev.label])
  return {"acc": float(probe.score(test["image_emb"], test[ev.label]))}
