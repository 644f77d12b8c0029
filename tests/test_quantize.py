"""mmjax quantize (qwix PTQ): int8-weight and w8a8 workdirs that load, run and evaluate
like any other; quantization-aware fine-tuning; the errors."""
import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cli

import mmjax
from mmjax import data as mmdata
from mmjax import parallel
from mmjax.deploy import quantize as quantize_lib
from mmjax.io.trees import flat
from mmjax.models import quantized
from mmjax.models.dense import plain_matmuls
from mmjax.train.loop import dummy_batch, make_step, setup


def _test_batch(config, n=128):
  """n held-out digits images: the eval pipeline's first batch."""
  it = mmdata.make_iterator(config.data, "test", batch_size=n, train=False,
                            tokenizer=mmdata.get_tokenizer(config.data))
  return {k: v for k, v in next(it).items() if k == "image"}


def _logits(path, batch):
  got = mmjax.load(path)
  model = got.model()
  fn = jax.jit(lambda v, b: model.apply(v, b, method=model.classify))
  return np.asarray(fn(got.variables, batch)), got


@pytest.fixture(scope="module")
def int8_workdir(digits_tiny_workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("quantize") / "int8"
  r = cli("quantize", "--workdir", str(digits_tiny_workdir), "--out", str(out),
          "--mode", "int8-weight")
  assert r.returncode == 0, r.stderr
  return out, json.loads(r.stdout)


def test_plain_matmuls_keep_the_forward(digits_tiny_workdir):
  """The path qwix quantizes (plain einsums, unfused q/k/v) computes what training does."""
  got = mmjax.load(digits_tiny_workdir)
  model, batch = got.model(), dummy_batch(got.config, 4)
  batch["image"] = np.random.default_rng(0).normal(size=batch["image"].shape).astype("f4")
  fused = model.apply(got.variables, batch, method=model.classify)
  with plain_matmuls():
    plain = model.apply(got.variables, batch, method=model.classify)
  np.testing.assert_allclose(plain, fused, rtol=1e-5, atol=1e-5)


def test_int8_weight_close_to_float_and_smaller(digits_tiny_workdir, int8_workdir):
  out, summary = int8_workdir
  batch = _test_batch(mmjax.load(digits_tiny_workdir, params=False).config)
  ref, _ = _logits(digits_tiny_workdir, batch)
  q, got = _logits(out, batch)
  chex.assert_equal_shape([q, ref])
  assert got.config.model.quantize.mode == "int8-weight"
  # Every Dense kernel is int8 on disk (read back as saved), with a scale per column.
  kernels = {k: v for k, v in flat(got.params).items() if "/kernel/array/" in k}
  assert kernels and all(v.dtype == np.int8 for k, v in kernels.items() if k.endswith("qvalue"))
  assert "classifier/kernel/array/qvalue" in kernels
  # Stated tolerance: logits within 3% of their range, the same class for >= 90% (an
  # 8-step model: many near-ties between classes).
  assert np.abs(q - ref).max() <= 0.03 * np.abs(ref).max()
  assert (q.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
  assert not np.array_equal(q, ref)          # quantization did happen
  saved = sum(np.asarray(v).nbytes for v in jax.tree.leaves(got.params))
  assert saved == summary["quantized_params_bytes"]
  # Tiny model: posemb, norms, biases and the patch convolution stay float32.
  assert saved < 0.55 * summary["float_params_bytes"]


def test_quantized_workdir_evaluates(digits_tiny_workdir, int8_workdir):
  """`mmjax eval` reads the int8 checkpoint (the workdir's config says it is quantized,
  whatever --config brings the evaluators); accuracy stays within 3 points of float."""
  out, _ = int8_workdir
  q = cli("eval", "--workdir", str(out), "--config", "finetune_digits:tiny")
  f = cli("eval", "--workdir", str(digits_tiny_workdir), "--config", "finetune_digits:tiny")
  assert q.returncode == 0 and f.returncode == 0, q.stderr + f.stderr
  q_acc, f_acc = json.loads(q.stdout)["report_acc"], json.loads(f.stdout)["report_acc"]
  assert abs(q_acc - f_acc) <= 0.03, (q_acc, f_acc)


def test_w8a8_static_calibration(digits_tiny_workdir, tmp_path):
  out = tmp_path / "w8a8"
  r = cli("quantize", "--workdir", str(digits_tiny_workdir), "--out", str(out),
          "--mode", "w8a8", "--calibration-steps", "2")
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["calibration_steps"] == 2
  batch = _test_batch(mmjax.load(digits_tiny_workdir, params=False).config)
  ref, _ = _logits(digits_tiny_workdir, batch)
  q, got = _logits(out, batch)
  assert got.config.model.quantize.to_dict() == {"mode": "w8a8", "static": True}
  scales = {k: float(np.asarray(v).max()) for k, v in flat(got.params).items()
            if "_lhs_scale/" in k}
  # One calibrated input scale per Dense: 4 per attention + 2 per MLP + the classifier.
  depth = got.config.model.image.depth
  assert len(scales) == 6 * depth + 1
  assert all(np.isfinite(s) and s > 0 for s in scales.values())
  assert np.abs(q - ref).max() <= 0.08 * np.abs(ref).max()
  assert (q.argmax(-1) == ref.argmax(-1)).mean() >= 0.85


def test_quantize_errors(digits_tiny_workdir, tmp_path):
  def fails(*args, says):
    r = cli("quantize", *args)
    assert r.returncode == 2, r.stdout
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

  empty = tmp_path / "empty"
  empty.mkdir()
  fails("--workdir", str(empty), "--out", str(tmp_path / "a"), "--mode", "int8-weight",
        says="neither an mmjax workdir")
  no_ckpt = tmp_path / "no_ckpt"
  (no_ckpt / "checkpoints").mkdir(parents=True)
  (no_ckpt / "config.json").write_text((digits_tiny_workdir / "config.json").read_text())
  fails("--workdir", str(no_ckpt), "--out", str(tmp_path / "b"), "--mode", "int8-weight",
        says="no checkpoint")
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("mine")
  fails("--workdir", str(digits_tiny_workdir), "--out", str(busy), "--mode", "w8a8",
        says="not an empty directory")
  assert [p.name for p in busy.iterdir()] == ["keep.txt"]
  assert (busy / "keep.txt").read_text() == "mine"
  resnet = tmp_path / "resnet"
  (resnet / "checkpoints").mkdir(parents=True)
  config = json.loads((digits_tiny_workdir / "config.json").read_text())
  config["model"]["image"]["type"] = "resnet"
  (resnet / "config.json").write_text(json.dumps(config))
  fails("--workdir", str(resnet), "--out", str(tmp_path / "c"), "--mode", "int8-weight",
        says="nn.Conv")
  fails("--workdir", str(digits_tiny_workdir), "--out", str(tmp_path / "d"),
        "--mode", "int8-weight", "--calibration-steps", "4", says="--mode w8a8")
  assert not any((tmp_path / n).exists() for n in "abcd")


def test_quantize_user_errors_are_one_line_and_bugs_keep_their_traceback(
    digits_tiny_workdir, tmp_path, monkeypatch):
  broken = tmp_path / "broken"
  (broken / "checkpoints").mkdir(parents=True)
  (broken / "config.json").write_text('{"model": ')
  r = cli("quantize", "--workdir", str(broken), "--out", str(tmp_path / "a"),
          "--mode", "int8-weight")
  assert r.returncode == 2 and "malformed JSON" in r.stderr, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr

  def bug(*_, **__):
    raise ValueError("a bug inside the quantization")

  monkeypatch.setattr(quantize_lib.qwix, "quantize_params", bug)
  with pytest.raises(ValueError, match="a bug inside the quantization"):
    cli("quantize", "--workdir", str(digits_tiny_workdir), "--out", str(tmp_path / "b"),
        "--mode", "int8-weight")
  assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_quantization_aware_training_learns(digits_tiny_workdir):
  """config.finetune.quantize trains the fake-quantized model in the one loop: int8
  forward (it differs from the float one), gradients straight through, loss falls."""
  config = mmjax.load_config("finetune_digits:tiny", [
      "--config.evals={}", "--config.finetune.quantize.weight=int8",
      "--config.finetune.quantize.act=int8", "--config.optim.lr=3e-3",
      "--config.optim.warmup_steps=0", "--config.total_steps=12"])
  run = setup(config)
  step = make_step(run)
  it = mmdata.make_iterator(run.config.data, "train", batch_size=config.batch_size, train=True,
                            tokenizer=run.tokenizer)
  batch = parallel.device_batch(next(it), run.mesh)
  state, losses = run.state, []
  for _ in range(12):       # one fixed batch: the loss must fall
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
  float_model = mmjax.build_model(run.config, run.tokenizer.vocab_size)
  image = {"image": jnp.asarray(batch["image"])}
  q = run.model.apply({"params": state.params}, image, method=run.model.classify)
  f = float_model.apply({"params": state.params}, image, method=float_model.classify)
  assert not np.allclose(q, f, atol=1e-6) and np.abs(q - f).max() < 0.2 * np.abs(f).max()


def test_rules_keep_convolutions_and_attention_float():
  assert quantized.rules("int8-weight")[0].weight_qtype is None
  with pytest.raises(ValueError, match="static activation scales"):
    quantized.rules("int8-weight", static=True)
  keep = re.compile(quantized.KEEP_FLOAT)
  assert keep.fullmatch("image_tower/patch_embed") and keep.fullmatch("")   # "": the root
  assert keep.fullmatch("image_tower/encoder/block_0/attn")
  assert not keep.fullmatch("image_tower/encoder/block_0/attn/query")


def test_a_captioner_quantizes_and_generates_like_float(serve_workdir, tmp_path):
  """The decoder (cross-attention, tied LM head through the token embedding) quantizes:
  its Dense kernels are int8 on disk, the embedding stays float, and greedy captions and
  their log-probabilities stay those of the float model."""
  out = tmp_path / "int8"
  result = cli("quantize", "--workdir", str(serve_workdir), "--out", str(out),
               "--mode", "int8-weight")
  assert result.returncode == 0, result.stderr[-2000:]
  saved = flat(mmjax.load(out).params)
  assert any(k.startswith("text_tower/") and k.endswith("kernel/array/qvalue")
             and v.dtype == np.int8 for k, v in saved.items())
  assert saved["text_tower/token_embed/embedding"].dtype == np.float32
  images = list((np.random.RandomState(0).rand(2, 32, 32, 3) * 255).astype(np.uint8))
  ref = mmjax.generate(serve_workdir, images=images, max_tokens=6)
  got = mmjax.generate(out, images=images, max_tokens=6)
  assert [r["generated"] for r in got] == [r["generated"] for r in ref]
  np.testing.assert_allclose([r["scores"] for r in got], [r["scores"] for r in ref], rtol=0.01)
