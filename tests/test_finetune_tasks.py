"""Task heads, the classify objective, the classification report, and fine-tuning from a
pretrained workdir through `mmjax finetune`."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import mmjax
from mmjax import objectives
from mmjax.tuning.init import load_init
from mmjax.models import build_model
from mmjax.io import CheckpointMismatch

from conftest import cli, read_workdir

B, S, L, V, C = 3, 16, 8, 40, 4


def test_classify_objective_smooths_labels_and_skips_padding():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
  batch = {"y": jnp.array([0, 2, 1]), "valid": jnp.array([1.0, 1.0, 0.0])}
  loss, m = objectives.classify({"class_logits": logits}, batch, label="y", label_smoothing=0.3)
  logp = jax.nn.log_softmax(logits[:2])
  target = np.full((2, 3), 0.1) + 0.7 * np.eye(3)[[0, 2]]     # 0.3 spread over 3 classes
  np.testing.assert_allclose(loss, -(target * logp).sum(1).mean(), rtol=1e-6)
  assert float(m["acc"]) == 0.5                                 # the padded row is not counted
  with pytest.raises(KeyError, match="objective_options.classify.label"):
    objectives.classify({"class_logits": logits}, batch, label="label")
  weighted = objectives.combined({"classify": 2.0}, {"classify": {"label": "y"}})
  total, metrics = weighted({"class_logits": logits}, batch)
  assert float(total) == pytest.approx(2 * float(metrics["classify_loss"]))


def _model(input_):
  t = lambda **kw: dict(variant="mu", **kw)
  return build_model(ml_collections.ConfigDict(dict(
      data=dict(image_size=S, max_len=L),
      model=dict(image=t(patch=4), text=t(vocab_size=V), fusion=t(mode="merged"),
                 classifier=dict(input=input_, num_classes=C)))))


@pytest.mark.parametrize("input_,reads", [("image", {"image"}), ("text", {"text"}),
                                          ("fusion", {"image", "text"})])
def test_classifier_reads_its_input(input_, reads):
  r = np.random.default_rng(0)
  batch = {"image": r.normal(size=(B, S, S, 3)).astype(np.float32),
           "text": r.integers(5, V, (B, L)).astype(np.int32), "text_mask": np.ones((B, L), np.int32)}
  other = {"image": r.normal(size=(B, S, S, 3)).astype(np.float32),
           "text": r.integers(5, V, (B, L)).astype(np.int32)}
  model = _model(input_)
  params = model.init(jax.random.key(0), batch)["params"]
  logits = model.apply({"params": params}, batch)["class_logits"]
  assert logits.shape == (B, C)
  np.testing.assert_allclose(model.apply({"params": params}, batch, method=model.classify),
                             logits, atol=1e-6)
  for key in ("image", "text"):
    changed = model.apply({"params": params}, dict(batch, **{key: other[key]}),
                          method=model.classify)
    assert (not np.allclose(changed, logits, atol=1e-5)) == (key in reads), key


def test_classifier_needs_its_tower():
  c = ml_collections.ConfigDict(dict(data=dict(image_size=S, max_len=L),
                                     model=dict(image=dict(variant="mu", patch=4),
                                                classifier=dict(input="text", num_classes=C))))
  with pytest.raises(ValueError, match="model.text"):
    build_model(c)


@pytest.fixture
def pretrained(digits_tiny_workdir):
  """A tiny digits classifier trained for a few steps: the checkpoint to fine-tune from."""
  return digits_tiny_workdir


def test_finetune_cli_from_workdir_keeps_base_frozen_and_reports(pretrained, tmp_path):
  wd = tmp_path / "lora"
  r = cli("finetune", "--config", "finetune_digits:tiny,lora", "--init", str(pretrained),
          "--workdir", str(wd))
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout.splitlines()[-1])
  # scikit-learn's table, printed by the evaluator.
  assert "weighted avg" in r.stderr and "precision    recall  f1-score   support" in r.stderr
  assert "init:" in r.stderr and "params loaded" in r.stderr

  _, base, _ = read_workdir(pretrained)
  _, tuned, step = read_workdir(wd)
  assert step == 8
  base, tuned = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (base, tuned))
  lora = {k for k in tuned if "lora" in jax.tree_util.keystr(k)}
  assert lora and set(tuned) - set(base) == lora
  moved = set()
  for k, v in base.items():
    if not np.array_equal(v, tuned[k]):
      moved.add(jax.tree_util.keystr(k))
  assert moved == {"['classifier']['bias']", "['classifier']['kernel']"}, moved

  report = json.loads((wd / "reports" / "report.json").read_text())
  rep, confusion = report["report"], np.array(report["confusion"])
  assert report["class_names"][:2] == ["zero", "one"]
  assert sum(rep[n]["support"] for n in report["class_names"]) == 360 == confusion.sum()
  assert {"macro avg", "weighted avg", "accuracy"} <= set(rep)
  assert rep["accuracy"] == pytest.approx(np.trace(confusion) / 360)
  assert result["report_acc"] == pytest.approx(rep["accuracy"], abs=1e-4)   # CLI rounds
  assert result["report_macro_f1"] == pytest.approx(rep["macro avg"]["f1-score"], abs=1e-4)
  png = (wd / "reports" / "report_confusion.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_init_from_another_model_lists_the_keys(pretrained):
  config = mmjax.load_config("finetune_digits:tiny", ["--config.model.image.depth=3",
                                                      f"--config.init.path={pretrained}"])
  model = build_model(config)
  params = model.init(jax.random.key(0), {"image": jnp.zeros((1, 32, 32, 3))})["params"]
  with pytest.raises(CheckpointMismatch) as e:
    load_init(config, params)
  assert "missing (in the model, not the checkpoint): 16" in str(e.value)   # one block
  assert "image_tower/encoder/block_2/attn/query/kernel" in str(e.value)
  # A new head of another size must be listed as new or ignored, not silently replaced.
  config = mmjax.load_config("finetune_digits:tiny", [
      "--config.model.classifier.num_classes=3", f"--config.init.path={pretrained}",
      "--config.init.new=''"])
  model = build_model(config)
  params = model.init(jax.random.key(0), {"image": jnp.zeros((1, 32, 32, 3))})["params"]
  with pytest.raises(CheckpointMismatch, match=r"classifier/kernel: checkpoint \(32, 10\)"):
    load_init(config, params)
  with config.unlocked():
    config.init.ignore = r"^classifier/"
    config.init.new = r"^classifier/"
  merged, _, counts = load_init(config, params)
  assert counts["new"] == 2 and merged["classifier"]["kernel"].shape == (32, 3)
