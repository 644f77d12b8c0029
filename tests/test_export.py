"""`mmjax export`: StableHLO artifacts that a fresh process runs without mmjax's model code,
equal to the live model; ONNX encoders that onnxruntime runs equally; one-line errors."""
import json
import pathlib
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import cli, run_python

import mmjax
from mmjax.config_blocks import resnet_tower
from mmjax.deploy import export as export_lib
from mmjax.io import workdir as workdir_lib
from mmjax.train.loop import _init_variables_fn
from mmjax.train.state import initial_state
from mmjax.tuning import prune

LABELS = ["circle", "square", "triangle", "dog"]
TEXTS = ["a small red circle", "a big blue square", "a cat", "a dog left of a green triangle"]


def resnet_workdir(path: pathlib.Path) -> pathlib.Path:
  """An untrained two-stage ResNet (width 8) digits classifier whose BatchNorm statistics
  are set away from their initial 0 and 1, so that a function that ignored them would
  differ."""
  config = mmjax.load_config("finetune_digits:tiny", ["--config.evals={}"])
  with config.unlocked():
    config.model.image = resnet_tower(variant="", block="basic", depths=(1, 1), width=8)
  fresh = _init_variables_fn(mmjax.build_model(config), config, jax.random.PRNGKey(0))()
  rng = np.random.default_rng(0)
  stats = jax.tree_util.tree_map_with_path(
      lambda path, x: (rng.uniform(0.5, 1.5, x.shape) if "var" in str(path[-1]) else
                       rng.normal(0, 0.3, x.shape)).astype(np.float32), fresh["batch_stats"])
  workdir_lib.write_workdir(path, config, initial_state(config, fresh["params"],
                                                        batch_stats=stats), {})
  return path


def images(n: int, seed: int = 0) -> list[Image.Image]:
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 256, (11 + i, 9, 3), np.uint8)) for i in range(n)]


def reference(workdir, pics, texts, labels) -> dict[str, np.ndarray]:
  """What the live model computes for the exported functions."""
  loaded = mmjax.load(workdir)
  model, v = loaded.model(), loaded.variables
  x = loaded.preprocess.batch(pics)
  classify = jax.jit(lambda v, x: model.apply(v, {"image": x}, method="classify"))
  if model.text_tower is None:
    return {"x": x, "image": np.asarray(jax.jit(lambda v, x: model.apply(
        v, x, method="encode_image")[1]["pooled"])(v, x)), "classify": np.asarray(classify(v, x))}
  ids, mask = loaded.tokenizer.encode(texts, loaded.config.data.max_len)
  p_ids, p_mask = loaded.tokenizer.encode(labels, loaded.config.data.max_len)
  apply = jax.jit(lambda v, *xs, method: model.apply(v, *xs, method=method),
                  static_argnames="method")
  image_emb = np.asarray(apply(v, x, method="encode_image")[0])
  text_emb = np.asarray(apply(v, ids, mask, method="encode_text")[0])
  prompt_emb = np.asarray(apply(v, p_ids, p_mask, method="encode_text")[0])
  scale = np.exp(min(float(loaded.params["logit_scale"]), np.log(100.0)))
  class_logits = np.asarray(classify(v, x))
  return {"x": x, "ids": ids, "mask": mask, "image": image_emb, "text": text_emb,
          "zeroshot": scale * image_emb @ prompt_emb.T, "classify": class_logits}


@pytest.fixture(scope="module")
def exported(serve_workdir, tmp_path_factory):
  """(workdir, stablehlo export dir) of conftest's serve_workdir: a tiny captioner with a
  joint image-text embedding and an image classifier, so every function exports."""
  work, out = serve_workdir, tmp_path_factory.mktemp("export") / "out"
  r = cli("export", "--workdir", str(work), "--out", str(out))
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout.strip().splitlines()[-1])["functions"] == [
      "caption", "classify", "image", "text", "zeroshot"]
  return work, out


def test_manifest_states_functions_specs_and_platforms(exported):
  work, out = exported
  m = json.loads((out / "manifest.json").read_text())
  assert m["format"] == "stablehlo" and m["step"] == 0
  assert m["mmjax_version"] == mmjax.__version__ and len(m["config_hash"]) == 64
  assert m["platforms"] == ["cpu", "cuda", "tpu"]
  assert m["functions"]["image"]["inputs"] == [
      {"name": "image", "shape": ["b", 32, 32, 3], "dtype": "float32"}]
  assert m["functions"]["zeroshot"]["outputs"] == [
      {"name": "logits", "shape": ["b", "n"], "dtype": "float32"}]
  assert m["functions"]["classify"]["outputs"][0]["shape"] == ["b", 3]
  assert m["class_names"] == ["circle", "square", "triangle"]
  assert (out / "tokenizer.json").read_bytes() == (work / "tokenizer.json").read_bytes()
  assert json.loads((out / "preprocess.json").read_text())["resize"] == [32, 32]


def test_fresh_process_without_model_code_equals_live_model(exported, tmp_path):
  """One artifact per function runs batch 1 and batch 3; outputs within 1e-5 of the live
  model's; the process imported no mmjax model, train or io code, nor Flax or Orbax."""
  work, out = exported
  pics = images(3)
  ref = reference(work, pics, TEXTS[:3], LABELS)
  for i, im in enumerate(pics):
    im.save(tmp_path / f"{i}.png")
  code = textwrap.dedent(f"""
      import sys, numpy as np
      from PIL import Image
      import mmjax
      e = mmjax.load_exported({str(out)!r})
      pics = [Image.open({str(tmp_path)!r} + f"/{{i}}.png") for i in range(3)]
      x = e.image_rows(pics)
      ids, mask = e.text_rows({TEXTS[:3]!r})
      got = dict(x=x, ids=ids, mask=mask, image=e.embed_images(pics),
                 image1=e.functions["image"](x[:1]), text=e.embed_texts({TEXTS[:3]!r}),
                 text1=e.functions["text"](ids[:1], mask[:1]),
                 zeroshot=e.functions["zeroshot"](x, *e.text_rows({LABELS!r})),
                 zeroshot_probs=e.zeroshot(pics, {LABELS!r}),
                 classify=e.functions["classify"](x), classify_probs=e.classify(pics))
      np.savez({str(tmp_path / "got.npz")!r}, **got)
      print(sorted(m for m in sys.modules if m.startswith(
          ("mmjax.models", "mmjax.train", "mmjax.io", "mmjax.data", "flax", "orbax"))))
  """)
  r = run_python(code, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip().splitlines()[-1] == "[]"
  got = dict(np.load(tmp_path / "got.npz"))
  np.testing.assert_array_equal(got["x"], ref["x"])          # the same preprocessing
  np.testing.assert_array_equal(got["ids"], ref["ids"])      # and tokenization
  np.testing.assert_array_equal(got["mask"], ref["mask"])
  embed_dim = json.loads((out / "manifest.json").read_text())["embed_dim"]
  chex.assert_shape([got["image"], got["text"]], (3, embed_dim))
  chex.assert_shape(got["zeroshot"], (3, len(LABELS)))
  for name in ("image", "text", "zeroshot", "classify"):
    np.testing.assert_allclose(got[name], ref[name], atol=1e-5, err_msg=name)
  np.testing.assert_allclose(got["image1"], ref["image"][:1], atol=1e-5)
  np.testing.assert_allclose(got["text1"], ref["text"][:1], atol=1e-5)
  softmax = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(
      z - z.max(1, keepdims=True)).sum(1, keepdims=True)
  np.testing.assert_allclose(got["zeroshot_probs"], softmax(ref["zeroshot"]), atol=1e-5)
  np.testing.assert_allclose(got["classify_probs"], softmax(ref["classify"]), atol=1e-5)
  assert np.ptp(ref["zeroshot"], axis=1).min() > 1e-4    # the labels do score differently


def test_exported_functions_check_their_inputs(exported, tmp_path):
  e = mmjax.load_exported(exported[1])
  with pytest.raises(ValueError, match=r"text: input text has shape \[2, 5\]"):
    e.functions["text"](np.zeros((2, 5), np.int32), np.ones((2, 5), np.int32))
  with pytest.raises(ValueError, match=r"input text_mask has shape \[3, 16\]"):
    e.functions["text"](np.zeros((2, 16), np.int32), np.ones((3, 16), np.int32))
  with pytest.raises(ValueError, match="zeroshot needs at least one label"):
    e.zeroshot(images(1), [])
  (tmp_path / "not.png").write_text("text")
  with pytest.raises(ValueError, match=r"image '.*not.png' is not a readable image"):
    e.embed_images([tmp_path / "not.png"])


def test_onnx_encoders_equal_mmjax(exported, tmp_path):
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top  # the onnx extra
  work, _ = exported
  r = cli("export", "--workdir", str(work), "--out", str(tmp_path / "onnx"), "--format", "onnx")
  assert r.returncode == 0, r.stderr
  assert sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx")) == ["image.onnx",
                                                                        "text.onnx"]
  manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
  assert manifest["format"] == "onnx" and manifest["onnx_opset"] == 23
  assert manifest["functions"]["text"]["inputs"][1] == {"name": "text_mask",
                                                        "shape": ["B", 16], "dtype": "int32"}
  ref = reference(work, images(3, seed=1), TEXTS, LABELS)
  for name, feeds in (("image", {"image": ref["x"]}),
                      ("text", {"text": ref["ids"], "text_mask": ref["mask"]})):
    session = ort.InferenceSession(str(tmp_path / "onnx" / f"{name}.onnx"))
    assert session.get_inputs()[0].shape[0] == "B"           # a symbolic batch
    for rows in (slice(0, 1), slice(None)):
      got = session.run(None, {k: v[rows] for k, v in feeds.items()})[0]
      np.testing.assert_allclose(got, ref[name][rows], atol=1e-4, err_msg=name)


def test_a_function_without_tpu_lowering_falls_back_to_cpu_and_says_so():
  # XLA's eig has a CPU lowering only: the three-platform export refuses, CPU alone works.
  fn = export_lib.Function(lambda v, x: jnp.linalg.eig(x * v["w"])[0].real,
                           (export_lib.Spec("x", ("b", 2, 2), "float32"),), ("eigenvalues",),
                           "")
  _, avals, platforms, note = export_lib.export_stablehlo(fn, {"w": np.ones(2, np.float32)})
  assert platforms == ("cpu",) and "not found for platforms ['tpu']" in note
  assert str(avals[0].shape[0]) == "b"


@pytest.fixture(scope="module")
def resnet_work(tmp_path_factory):
  return resnet_workdir(tmp_path_factory.mktemp("resnet") / "work")


def test_resnet_exports_with_its_batchnorm_statistics(resnet_work, tmp_path):
  work = resnet_work
  r = cli("export", "--workdir", str(work), "--out", str(tmp_path / "out"),
          "--what", "classify")
  assert r.returncode == 0, r.stderr
  loaded = mmjax.load(work)
  model, x = loaded.model(), loaded.preprocess.batch(images(3))
  classify = lambda stats: np.asarray(model.apply({"params": loaded.params, "batch_stats": stats},
                                                  {"image": x}, method="classify"))
  want = classify(loaded.batch_stats)
  reset = classify(jax.tree_util.tree_map_with_path(
      lambda path, v: np.ones_like(v) if "var" in str(path[-1]) else np.zeros_like(v),
      loaded.batch_stats))
  assert np.abs(want - reset).max() > 1e-3       # the statistics matter to the output
  got = mmjax.load_exported(tmp_path / "out").functions["classify"](x)
  np.testing.assert_allclose(got, want, atol=1e-5)


def exported_equals_live(workdir, out):
  ref = reference(workdir, images(3, seed=2), TEXTS[:3], LABELS)
  e = mmjax.load_exported(out)
  inputs = {"image": lambda: (ref["x"],), "text": lambda: (ref["ids"], ref["mask"]),
            "zeroshot": lambda: (ref["x"], *e.text_rows(LABELS)), "classify": lambda: (ref["x"],)}
  assert set(e.functions) - {"caption"} == set(inputs) & set(ref)
  for name in e.functions.keys() & ref.keys():
    np.testing.assert_allclose(e.functions[name](*inputs[name]()), ref[name], atol=1e-5,
                               err_msg=name)


def test_quantized_workdir_exports_its_int8_weights(tmp_path):
  """An int8-weight (qwix PTQ) ViT digits classifier: int8 in variables.npz, outputs equal
  to the live quantized model's."""
  config = mmjax.load_config("finetune_digits:tiny", ["--config.evals={}"])
  fresh = _init_variables_fn(mmjax.build_model(config), config, jax.random.PRNGKey(0))()
  workdir_lib.write_workdir(tmp_path / "float", config, initial_state(config, fresh["params"]),
                            {})
  r = cli("quantize", "--workdir", str(tmp_path / "float"), "--out", str(tmp_path / "q"),
          "--mode", "int8-weight")
  assert r.returncode == 0, r.stderr
  for work, out in (("float", "float_out"), ("q", "out")):
    r = cli("export", "--workdir", str(tmp_path / work), "--out", str(tmp_path / out))
    assert r.returncode == 0, r.stderr
  with np.load(tmp_path / "out" / "variables.npz") as z:
    assert np.dtype(np.int8) in {z[k].dtype for k in z.files}
  size = lambda d: json.loads((d / "manifest.json").read_text())["variables"]["bytes"]
  assert size(tmp_path / "out") < 0.6 * size(tmp_path / "float_out")
  exported_equals_live(tmp_path / "q", tmp_path / "out")
  r = cli("export", "--workdir", str(tmp_path / "q"), "--out", str(tmp_path / "onnx"),
          "--format", "onnx")
  assert r.returncode == 2 and "cannot convert a qwix-quantized model" in r.stderr
  assert not (tmp_path / "onnx").exists()


def test_pruned_workdir_exports_its_zeros(exported, tmp_path):
  """A magnitude-pruned checkpoint (zeros in the params, masks in the train state)."""
  work, _ = exported
  loaded = mmjax.load(work)
  pruner = prune.Pruner(0.5, "oneshot", "global", r"/encoder/.*/kernel$", 1, 1)
  masks = pruner.new_masks(loaded.params, 0.5)
  state = initial_state(loaded.config, prune.apply_masks(loaded.params, masks)
                        ).replace(masks=masks)
  workdir_lib.write_workdir(tmp_path / "pruned", loaded.config, state, {}, loaded.tokenizer)
  workdir_lib.write_label_names(tmp_path / "pruned", loaded.label_names)
  r = cli("export", "--workdir", str(tmp_path / "pruned"), "--out", str(tmp_path / "out"))
  assert r.returncode == 0, r.stderr
  with np.load(tmp_path / "out" / "variables.npz") as z:
    kernels = [z[k] for k in z.files if "/encoder/" in k and k.endswith("/kernel")]
  zeros = sum(k.size - np.count_nonzero(k) for k in kernels) / sum(k.size for k in kernels)
  assert 0.49 < zeros < 0.51
  exported_equals_live(tmp_path / "pruned", tmp_path / "out")


def test_captioner_exports_greedy_captions(exported):
  """The exported greedy captions are mmjax.generate's, for a batch of 3 and of 1 through
  the one artifact."""
  work, out = exported
  pics = images(3, seed=3)
  want = [got["generated"][0] for got in mmjax.generate(work, images=pics)]
  e = mmjax.load_exported(out)
  assert e.caption(pics) == want and e.caption(pics[:1]) == want[:1]
  assert [e.manifest["caption"]["max_tokens"]] == e.manifest["functions"]["caption"][
      "outputs"][0]["shape"][1:]


@pytest.mark.parametrize("args, message", [
    (["--what", "image,nope"], "--what 'nope': unknown function"),
    (["--what", "zeroshot", "--format", "onnx"], "--format onnx writes image and text only"),
])
def test_bad_what_is_a_one_line_error(exported, tmp_path, args, message):
  work, _ = exported
  r = cli("export", "--workdir", str(work), "--out", str(tmp_path / "out"), *args)
  assert r.returncode == 2 and message in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert not (tmp_path / "out").exists()
  assert not list(tmp_path.iterdir())                       # no temporary left behind


@pytest.mark.parametrize("what, message", [
    ("caption", "--what caption: this model has no decoder"),
    ("image,text", "--what 'text': this model has no text tower"),
])
def test_what_the_model_lacks_is_a_one_line_error(resnet_work, tmp_path, what, message):
  r = cli("export", "--workdir", str(resnet_work), "--out", str(tmp_path / "out"),
          "--what", what)
  assert r.returncode == 2 and message in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert not (tmp_path / "out").exists()


def test_classify_without_classifier_and_missing_checkpoint(tmp_path, exported):
  work, _ = exported
  no_head = tmp_path / "no_head"
  (no_head / "checkpoints").parent.mkdir()
  for f in ("config.json", "tokenizer.json"):
    text = (work / f).read_text()
    if f == "config.json":
      cfg = json.loads(text)
      cfg["model"]["classifier"]["num_classes"] = 0
      text = json.dumps(cfg)
    (no_head / f).write_text(text)
  r = cli("export", "--workdir", str(no_head), "--out", str(tmp_path / "o1"))
  assert r.returncode == 2 and "no checkpoint" in r.stderr and str(no_head) in r.stderr
  # The same weights under a config without a classifier: --what classify is refused.
  (no_head / "checkpoints").symlink_to(work / "checkpoints")
  r = cli("export", "--workdir", str(no_head), "--out", str(tmp_path / "o2"),
          "--what", "classify")
  assert r.returncode == 2, r.stderr
  assert "--what classify: this model has no classifier" in r.stderr
  assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_existing_output_is_not_overwritten(exported, tmp_path):
  work, _ = exported
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  r = cli("export", "--workdir", str(work), "--out", str(out))
  assert r.returncode == 2 and "exists and is not an empty directory" in r.stderr
  assert [p.name for p in out.iterdir()] == ["keep.txt"]
  assert (out / "keep.txt").read_text() == "mine"
