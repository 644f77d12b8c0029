import ml_collections
import numpy as np

import mmjax
from mmjax.evals import EvalContext, run_evals
from mmjax.evals.embed import Embedder
from mmjax.evals.retrieval import recall_at_k, same_rows
from mmjax.evals.zeroshot import class_scores, prompts
from mmjax.train.loop import setup


def test_recall_at_k_counts_any_positive():
  sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
  positive = np.eye(3, dtype=bool)
  r = recall_at_k(sim, positive, ks=(1, 2, 3))
  assert r == {"r1": 1 / 3, "r2": 2 / 3, "r3": 1.0}
  positive[1, 2] = True     # an identical caption elsewhere counts as a hit
  assert recall_at_k(sim, positive, ks=(1,))["r1"] == 2 / 3


def test_same_rows_marks_identical_captions():
  ids = np.array([[2, 5, 3], [2, 6, 3], [2, 5, 3]])
  np.testing.assert_array_equal(same_rows(ids), [[1, 0, 1], [0, 1, 0], [1, 0, 1]])


def test_zeroshot_mean_and_max_ensembles():
  assert prompts(["red", "blue"], ["a {} ball", "{} paint"]) == [
      "a red ball", "red paint", "a blue ball", "blue paint"]
  e = np.eye(4)
  # Class 0's prompts point along axes 0 and 1, class 1's along 2 and 3.
  images = np.array([[1.0, 0, 0, 0], [0, 0, 0, 1.0]])
  for ensemble in ("mean", "max"):
    assert class_scores(images, e, 2, ensemble).argmax(1).tolist() == [0, 1]
  # An image matching one prompt of class 1 strongly and class 0's on average:
  img = np.array([[0.6, 0.6, 0.0, 0.9]])
  assert class_scores(img, e, 2, "mean").argmax() == 0
  assert class_scores(img, e, 2, "max").argmax() == 1


def test_linear_probe_reads_labels_aligned_with_images():
  """Colour is partly linearly decodable even from a random-init ViT (measured
  0.38 on 512 test images); misaligned labels would give chance, 1/6."""
  config = mmjax.load_config("demo:tiny", ["--config.data.eval_size=256"])
  run = setup(config)
  ev = ml_collections.ConfigDict(dict(type="linear_probe", split="test", label="color",
                                      train_examples=1024, data=dict(num_objects=(1, 1))))
  ctx = EvalContext(config, run.tokenizer, Embedder(run.model, run.state.params, run.mesh))
  out = run_evals(ctx, {"probe": ev})
  assert out["probe_acc"] > 0.28, out


def test_held_out_sources_are_built_once_across_evaluations(monkeypatch):
  """The loop shares one `Sources` across evaluations: a user's files are
  validated once per run, not once per evaluator and eval step."""
  from mmjax import data as mmdata
  from mmjax.data import sources as sources_lib
  calls = []
  real = sources_lib.build_source
  monkeypatch.setattr(sources_lib, "build_source",
                      lambda *a, **k: calls.append(a[1]) or real(*a, **k))
  config = mmjax.load_config("demo:tiny")
  run = setup(config)
  evals = {k: config.evals[k] for k in ("retrieval", "itm", "zeroshot_color")}
  sources = mmdata.Sources()
  for _ in range(2):   # two evaluation steps of one run
    ctx = EvalContext(config, run.tokenizer, Embedder(run.model, run.state.params, run.mesh),
                      sources=sources)
    out = run_evals(ctx, evals)
    assert 0.0 <= out["zeroshot_color_acc"] <= 1.0
  # retrieval and itm share the test split; zero-shot reads single-object test images.
  assert calls == ["test", "test"]
