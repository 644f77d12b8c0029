"""Early stopping (best-N restore), delta checkpoints of PEFT fine-tunes, `init.towers`
from a Hugging Face directory, and LoRA merged into an HF export."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import traverse_util  # noqa: E402

import mmjax  # noqa: E402
from mmjax.io import hf as hf_pretrained  # noqa: E402
from mmjax.models import build_model  # noqa: E402
from mmjax.io import Checkpointer  # noqa: E402
from mmjax.train.early_stop import EarlyStopping  # noqa: E402
from mmjax.tuning import NEW_PARAMS, finetune_config  # noqa: E402

from conftest import read_workdir  # noqa: E402


def flat(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def assert_same(a, b):
  a, b = flat(a), flat(b)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def digits(*overrides, arg="tiny"):
  return mmjax.load_config(f"finetune_digits:{arg}", list(overrides))


# ------------------------------------------------------------------ early stopping


def test_early_stopping_stops_on_a_plateau_and_restores_the_best_step(tmp_path):
  common = ["--config.total_steps=16", "--config.eval_every=2", "--config.optim.lr=0.003",
            "--config.keep_checkpoints=5"]
  # min_delta=1: no later evaluation can beat the first by that much (accuracy <= 1).
  config = digits(*common, "--config.checkpoint_every=4", "--config.early_stop.metric=report_acc",
                  "--config.early_stop.patience=2", "--config.early_stop.min_delta=1.0")
  wd = tmp_path / "es"
  result = mmjax.train(config, wd, progress=False)
  assert result["early_stopped"] and result["best_step"] == 2 and result["steps"] == 6

  # The best step's params, from a run stopped there (same schedule, data and RNG).
  ref = tmp_path / "ref"
  mmjax.train(digits(*common, "--config.stop_after=2"), ref, progress=False)
  _, best, _ = read_workdir(ref, 2)
  _, final, step = read_workdir(wd)
  assert step == 6
  assert_same(final, best)
  _, at4, _ = read_workdir(wd, 4)          # training had moved on before the restore
  assert not np.array_equal(flat(at4)["classifier/kernel"], flat(best)["classifier/kernel"])

  evals = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()
           if json.loads(line).get("kind") == "eval"]
  assert [e["step"] for e in evals] == [2, 4, 6]
  assert result["report_acc"] == pytest.approx(evals[0]["report_acc"])    # of the best step
  report = json.loads((wd / "reports" / "report.json").read_text())
  assert report["report"]["accuracy"] == pytest.approx(evals[0]["report_acc"])

  again = mmjax.train(config, wd, progress=False)     # an early-stopped run stays stopped
  assert again["steps"] == 6 and again["early_stopped"]
  assert_same(read_workdir(wd)[1], best)


def test_early_stopping_counts_patience_with_min_delta_and_keeps_the_best_n(tmp_path):
  config = ml_collections.ConfigDict(dict(eval_every=1, early_stop=dict(
      metric="loss", mode="min", patience=2, min_delta=0.1, keep_best=2)))
  stopper = EarlyStopping(config, tmp_path)
  params = {"w": np.zeros(3, np.float32)}
  stops = []
  for step, loss in enumerate([1.0, 0.95, 0.8, 0.85, 0.79], start=1):
    params = {"w": np.full(3, step, np.float32)}
    stops.append(stopper.update(step, {"loss": loss}, params))
  # 0.95 is not 0.1 better than 1.0; 0.8 is; then 0.85 and 0.79 are not: stop.
  assert stops == [False, False, False, False, True]
  assert stopper.best_step == 3 and stopper.best == 0.8
  stopper.manager.wait_until_finished()
  assert sorted(stopper.manager.all_steps()) == [1, 3]          # the two best kept
  like = {"w": jax.numpy.zeros(3)}
  np.testing.assert_array_equal(stopper.best_params(like)[0]["w"], np.full(3, 3.0))
  with pytest.raises(KeyError, match="early_stop.metric='loss'.*'acc'"):
    EarlyStopping(config, tmp_path / "b").update(1, {"acc": 1.0}, params)
  with config.unlocked():
    config.eval_every = 0
  with pytest.raises(ValueError, match="eval_every"):
    EarlyStopping(config, tmp_path / "c")
  with config.unlocked():
    config.eval_every, config.early_stop.mode = 1, "best"
  with pytest.raises(ValueError, match="early_stop.mode"):
    EarlyStopping(config, tmp_path / "d")


# ------------------------------------------------------------------ delta checkpoints


def test_lora_checkpoints_hold_only_what_changed_and_load_back_whole(digits_tiny_workdir,
                                                                    tmp_path):
  base = digits_tiny_workdir      # finetune_digits:tiny, trained 8 steps (conftest)
  lora = lambda *o: digits(f"--config.init.path={base}", "--config.keep_checkpoints=3",
                           *o, arg="tiny,lora")
  # The delta run is cut at step 4 and resumed to 8; the reference trains all 8 steps in
  # one go and saves every param (save_frozen), so it is independent of delta loading.
  full = tmp_path / "full"
  mmjax.finetune(lora("--config.finetune.save_frozen=True"), full, progress=False)
  wd = tmp_path / "lora"
  mmjax.finetune(lora("--config.stop_after=4", "--config.checkpoint_every=4"), wd,
                 progress=False)
  result = mmjax.finetune(lora(), wd, progress=False)

  ckpt = Checkpointer(wd, keep=2)
  assert sorted(ckpt.manager.all_steps()) == [4, 8]
  saved = {s: flat(ckpt.manager.item_metadata(s)["state"]["params"]) for s in (4, 8)}
  pointer = {s: ckpt.data_of(s)["base"] for s in (4, 8)}
  ckpt.close()
  # The fresh run's checkpoint (4) and the resumed run's (8): a delta run stays a delta run.
  assert saved[4].keys() == saved[8].keys() and pointer[4] == pointer[8]
  saved, pointer = saved[8], pointer[8]
  assert saved and all("lora_" in k or k.startswith("classifier/") for k in saved), sorted(saved)
  assert pointer["path"] == str(base.absolute()) and pointer["step"] == 8
  assert "image_tower/encoder/block_0/attn/query/kernel" in pointer["params"]
  size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
  assert size(wd / "checkpoints" / "8" / "state") < size(base / "checkpoints" / "8" / "state")

  # Read back whole: frozen params are the base's, bit for bit.
  _, tuned, _ = read_workdir(wd)
  _, start, _ = read_workdir(base)
  tuned, start = flat(tuned), flat(start)
  for k in pointer["params"]:
    np.testing.assert_array_equal(tuned[k], start[k], err_msg=k)
  assert set(tuned) == set(saved) | set(pointer["params"])
  n = lambda keys: sum(tuned[k].size for k in keys)
  assert n(saved) < 0.5 * n(tuned)          # of this tiny model; <= 2% at B size (test_finetune)
  assert mmjax.evaluate(lora(), wd)["report_acc"] == pytest.approx(result["report_acc"])

  # Resuming a delta run gives the uninterrupted run's params.
  assert_same(read_workdir(wd)[1], read_workdir(full)[1])

  # save_frozen=True writes every param.
  ckpt = Checkpointer(full, keep=2)
  assert "base" not in ckpt.data_of(8)
  assert len(flat(ckpt.manager.item_metadata(8)["state"]["params"])) == len(tuned)
  ckpt.close()


# ------------------------------------------------------------------ Hugging Face


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_vit(path, classifier: bool):
  torch.manual_seed(0)
  cfg = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, image_size=16, patch_size=4, num_labels=5)
  model = (transformers.ViTForImageClassification if classifier else transformers.ViTModel)(cfg)
  model.eval().save_pretrained(path)
  return model


def test_finetune_from_an_hf_directory_takes_its_towers(tmp_path):
  hf_vit(tmp_path / "hf", classifier=True)
  config = digits(f"--config.init.path={tmp_path / 'hf'}", "--config.init.towers=True",
                  r"--config.init.ignore=^classifier\.", arg="tiny,lora")
  wd = tmp_path / "ft"
  result = mmjax.finetune(config, wd, progress=False)
  assert np.isfinite(result["report_acc"])
  run_config = json.loads((wd / "config.json").read_text())
  assert run_config["data"]["image_size"] == 16
  assert run_config["model"]["image"]["width"] == 32 and run_config["model"]["image"]["depth"] == 2

  _, tuned, _ = read_workdir(wd)        # a delta checkpoint whose base is the HF directory
  p = mmjax.from_pretrained(tmp_path / "hf")
  tuned, hf = flat(tuned), flat(p.params)
  frozen = [k for k in hf if k.startswith("image_tower/") and not k.startswith("image_tower/head")]
  assert frozen
  for k in frozen:
    np.testing.assert_array_equal(tuned[k], hf[k], err_msg=k)


def test_lora_is_merged_into_an_hf_export(tmp_path):
  hf_vit(tmp_path / "hf", classifier=False)
  p = mmjax.from_pretrained(tmp_path / "hf")
  config = ml_collections.ConfigDict(p.config.to_dict())
  config.finetune = finetune_config(strategy="lora", lora_rank=4, lora_alpha=8.0,
                                    lora_targets=("query", "value", "fc1"))
  model = build_model(config)
  params = hf_pretrained.load_params(tmp_path / "hf", config, allow_missing=NEW_PARAMS)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: rng.normal(0, 0.3, x.shape).astype(np.float32)
      if "lora_b" in jax.tree_util.keystr(path) else x, params)
  x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
  _, ours = model.apply({"params": params}, x, method="encode_image")
  _, plain = p.model.apply({"params": p.params}, x, method="encode_image")
  assert np.abs(np.asarray(ours["tokens"]) - np.asarray(plain["tokens"])).max() > 1e-2

  out = mmjax.save_pretrained(tmp_path / "export", config, params, hf_config_base=p.hf_config)
  reloaded = transformers.ViTModel.from_pretrained(out).eval()
  with torch.no_grad():
    ref = reloaded(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(ours["tokens"]), ref, atol=1e-4)

  config.finetune.adapter_dim = 8
  with pytest.raises(ValueError, match="adapters"):
    mmjax.save_pretrained(tmp_path / "export2", config, params)
