"""Knowledge distillation: the objective's maths, a teacher workdir in the one train loop
(left untouched), clear errors, and the label budget `data.train_examples`."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import mmjax
from mmjax import objectives, parallel
from mmjax.config import load_config
from mmjax.data import DataError, make_dataset
from mmjax.data import tokenizer as tokenizer_lib
from mmjax.train import loop
from mmjax.tuning.distill import load_teacher

from conftest import read_workdir, shared_run


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_distill_objective_is_scaled_kl_over_valid_rows():
  r = np.random.default_rng(0)
  student, teacher = r.normal(size=(2, 5, 7)).astype(np.float32) * 3
  valid = np.array([1, 1, 0, 1, 1], np.float32)
  t = 3.0
  p, q = _softmax(teacher / t), _softmax(student / t)
  kl = (p * (np.log(p) - np.log(q))).sum(-1)
  want = t ** 2 * (kl * valid).sum() / valid.sum()
  agree = ((student.argmax(-1) == teacher.argmax(-1)) * valid).sum() / valid.sum()
  outputs = {"class_logits": jnp.asarray(student), "teacher_class_logits": jnp.asarray(teacher)}
  loss, metrics = objectives.distill(outputs, {"valid": jnp.asarray(valid)}, temperature=t)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics["agree"], agree)
  same = {"class_logits": jnp.asarray(teacher), "teacher_class_logits": jnp.asarray(teacher)}
  loss, metrics = objectives.distill(same, {})
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  assert float(metrics["agree"]) == 1.0


def test_distill_objective_without_a_teacher_says_what_to_set():
  with pytest.raises(KeyError, match="config.distill.teacher"):
    objectives.distill({"class_logits": jnp.zeros((2, 3))}, {})


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
  return shared_run(tmp_path_factory, "teacher", lambda wd: mmjax.train(
      load_config("distill_digits:teacher,tiny"), wd, progress=False))[0]


def _distill_config(teacher, *overrides):
  return load_config("distill_digits:distill,tiny",
                     [f"--config.distill.teacher={teacher}", *overrides])


def test_distilled_student_trains_and_the_teacher_is_untouched(teacher_dir, tmp_path):
  _, before, step = read_workdir(teacher_dir)
  mmjax.train(_distill_config(teacher_dir), tmp_path, progress=False)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in rows if r["kind"] == "train"][-1]
  assert np.isfinite(last["loss"]) and last["finite"] == 1.0
  assert {"distill_loss", "distill_agree", "classify_loss"} <= set(last)
  _, after, step_after = read_workdir(teacher_dir)
  assert step_after == step
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_teacher_sees_its_own_image_size_and_normalisation(teacher_dir):
  config = _distill_config(teacher_dir, "--config.data.image_size=16",
                           "--config.data.mean=(0.2, 0.2, 0.2)")
  teacher = load_teacher(config, parallel.make_mesh())
  unit = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  logits = teacher.fn(teacher.params, {"image": jnp.asarray((unit - 0.2) / 0.5)})
  tconfig, params, _ = read_workdir(teacher_dir)
  model = mmjax.build_model(tconfig)
  resized = jax.image.resize(jnp.asarray(unit), (2, 32, 32, 3), "bilinear")
  want = model.apply({"params": params}, {"image": (resized - 0.5) / 0.5}, method=model.classify)
  np.testing.assert_allclose(logits["class_logits"], want, atol=1e-5)


def test_hugging_face_vit_classifier_is_a_teacher(tmp_path):
  """A ViTForImageClassification directory (16x16 images) teaches the 32x32 student."""
  c = ml_collections.ConfigDict(dict(
      data=dict(image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3),
      model=dict(image=dict(width=32, depth=1, heads=2, mlp_dim=64, patch=8, pool="cls",
                            posemb_cls=True, num_classes=10))))
  model = mmjax.build_model(c)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), method="encode_image")
  mmjax.save_pretrained(tmp_path, c, params["params"])
  teacher = load_teacher(_distill_config(tmp_path), parallel.make_mesh())
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  logits = teacher.fn(teacher.params, {"image": images})["class_logits"]
  small = jax.image.resize(images, (2, 16, 16, 3), "bilinear")
  want = model.apply(params, small, method="encode_image")[1]["logits"]
  np.testing.assert_allclose(logits, want, atol=1e-5)


@pytest.mark.parametrize("overrides, error, match", [
    (["--config.model.classifier.num_classes=5"], ValueError, "10 classes .* is 5"),
    (["--config.objectives={'classify': 1.0}"], ValueError, "has no 'distill'"),
])
def test_mismatched_student_is_a_clear_error(teacher_dir, overrides, error, match):
  with pytest.raises(error, match=match):
    load_teacher(_distill_config(teacher_dir, *overrides), parallel.make_mesh())


def test_the_temperature_has_one_home():
  config = load_config("distill_digits:distill,tiny", ["--config.distill.temperature=3.0"])
  outputs = {"class_logits": jnp.array([[2.0, 0.0, 1.0]]),
             "teacher_class_logits": jnp.array([[0.0, 2.0, 1.0]])}
  batch = {"label": jnp.array([0]), "valid": jnp.ones((1,))}
  _, metrics = loop.loss_function(config)(outputs, batch)
  want, _ = objectives.distill(outputs, batch, temperature=3.0)
  other, _ = objectives.distill(outputs, batch, temperature=2.0)
  np.testing.assert_allclose(metrics["distill_loss"], want, rtol=1e-6)
  assert abs(float(want) - float(other)) > 1e-3
  with config.unlocked():
    config.objective_options.distill = dict(temperature=1.0)
  with pytest.raises(ValueError, match="set config.distill.temperature"):
    loop.loss_function(config)


def test_bad_teacher_path_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="distill.teacher='.*nowhere' does not exist"):
    load_teacher(_distill_config(tmp_path / "nowhere"), parallel.make_mesh())
  with pytest.raises(ValueError, match="distill.teacher is empty"):
    load_teacher(load_config("distill_digits:distill,tiny"), parallel.make_mesh())


class _Labelled:
  """30 examples, each naming itself; classes 0 and 1 in a 2:1 ratio, held in memory."""

  label_names = {"label": ["a", "b"]}

  def __init__(self):
    self.labels = np.array([i % 3 == 2 for i in range(30)], np.int32)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return dict(image=np.zeros((8, 8, 3), np.uint8), caption=f"example {i}",
                label=int(self.labels[i]), uid=str(i))


def _batches(n, epochs=2, batch=4):
  data = ml_collections.ConfigDict(dict(image_size=8, max_len=4, seed=3, train_examples=n))
  tok = tokenizer_lib.train_wordpiece([f"example {i}" for i in range(30)], 40)
  ds = make_dataset(data, "train", batch_size=batch, train=True, tokenizer=tok,
                    source=_Labelled(), process_index=0, process_count=1)
  per_epoch = n // batch
  return [[ds[e * per_epoch + i] for i in range(per_epoch)] for e in range(epochs)]


def test_train_examples_is_a_fixed_stratified_subset():
  epochs = _batches(12)
  seen = [np.concatenate([b["uid"] for b in epoch]) for epoch in epochs]
  assert len(set(seen[0])) == 12 and set(seen[0]) == set(seen[1])   # the same 12 each epoch
  labels = np.concatenate([b["label"] for b in epochs[0]])
  assert (labels == 1).sum() == 4                                     # the 2:1 ratio kept
  assert set(np.concatenate([b["uid"] for b in _batches(12)[0]])) == set(seen[0])
  with pytest.raises(DataError, match="train_examples=31"):
    _batches(31)
