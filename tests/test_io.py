"""mmjax.io: the one loading corner. Corrupt checkpoints fall back and are kept aside,
Orbax leftovers are cleaned, `load` tells workdirs from HF directories, and commands
that fail validation leave nothing behind."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import mmjax
from mmjax import cli, io
from mmjax.data import make_iterator
from mmjax.io.checkpointer import UNREADABLE_DIR
from mmjax.train.state import TrainState
from conftest import run_python


def _state(scale=1.0, opt=optax.adam(1e-3)):
  params = {"dense": {"kernel": jnp.full((4, 3), scale), "bias": jnp.zeros((3,))}}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                    rng=jax.random.PRNGKey(0))


def _saved(workdir, steps=(1, 2)):
  ckpt = io.Checkpointer(workdir, keep=5, async_save=False)
  for s in steps:
    ckpt.save(s, _state(float(s)), {"iterator": {"pos": s}}, '{"seed": 0}')
  ckpt.wait()
  ckpt.close()


def _corrupt(workdir, step):
  """Truncate the array data files of a step, as a full disk or a torn copy would."""
  files = [p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*")
           if p.is_file() and p.parent.name == "d"]
  assert files
  for f in files:
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 3])


def test_corrupt_latest_step_falls_back_and_is_kept_aside(tmp_path, caplog):
  _saved(tmp_path)
  _corrupt(tmp_path, 2)
  ckpt = io.Checkpointer(tmp_path, keep=5)
  with caplog.at_level(logging.WARNING, logger="mmjax"):
    state, data, step = ckpt.restore(_state())
  assert step == 1 and data["iterator"] == {"pos": 1}
  np.testing.assert_array_equal(state.params["dense"]["kernel"], np.full((4, 3), 1.0))
  warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warning) == 1 and "checkpoints/2 is unreadable" in warning[0]
  assert "\n" not in warning[0] and len(warning[0]) < 600     # one line, not 140
  assert (tmp_path / UNREADABLE_DIR / "2" / "state").is_dir()  # kept, not deleted
  assert ckpt.latest_step() == 1
  ckpt.save(2, _state(5.0), {}, "{}")       # the step can be written again
  ckpt.wait()
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_an_explicit_unreadable_step_is_a_one_line_error(tmp_path):
  _saved(tmp_path)
  _corrupt(tmp_path, 2)
  ckpt = io.Checkpointer(tmp_path, keep=5)
  with pytest.raises(io.UnreadableCheckpoint, match=r"checkpoints/2 is unreadable \((metadata|state)\): \w+"):
    ckpt.restore(_state(), step=2)
  assert (tmp_path / "checkpoints" / "2").is_dir()     # nothing moved when a step was asked


def test_read_only_loading_falls_back_without_touching_the_workdir(tmp_path, caplog):
  _saved(tmp_path)
  _corrupt(tmp_path, 2)
  ckpt = io.Checkpointer(tmp_path, keep=5, read_only=True)
  params, step = ckpt.read_params()
  assert step == 1 and float(params["dense"]["kernel"][0, 0]) == 1.0
  assert (tmp_path / "checkpoints" / "2").is_dir() and not (tmp_path / UNREADABLE_DIR).exists()


def test_no_readable_step_says_so(tmp_path):
  _saved(tmp_path)
  for s in (1, 2):
    _corrupt(tmp_path, s)
  with pytest.raises(io.UnreadableCheckpoint, match=r"no readable checkpoint .*steps \[2, 1\]"):
    io.Checkpointer(tmp_path, keep=5).restore(_state())


def test_optimizer_mismatch_is_named_only_when_it_is_one(tmp_path):
  _saved(tmp_path)
  with pytest.raises(io.CheckpointMismatch, match="optimizer state"):
    io.Checkpointer(tmp_path, keep=5).restore(_state(opt=optax.sgd(0.1, momentum=0.9)))
  _corrupt(tmp_path, 2)
  with pytest.raises(io.UnreadableCheckpoint) as e:
    io.Checkpointer(tmp_path, keep=5).restore(_state(), step=2)
  assert "does not fit" not in str(e.value)


def test_interrupted_save_leftovers_are_cleaned_on_open(tmp_path):
  _saved(tmp_path, steps=(1,))
  leftover = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000"
  (leftover / "state").mkdir(parents=True)
  io.Checkpointer(tmp_path, keep=5, read_only=True).close()
  assert leftover.exists()                       # readers never delete
  ckpt = io.Checkpointer(tmp_path, keep=5)   # Orbax cleans them before its first save
  ckpt.save(3, _state(), {}, "{}")
  ckpt.close()
  assert not leftover.exists()
  assert (tmp_path / "checkpoints" / "1").is_dir()


def test_kind_of_names_what_it_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"init.path='.*nowhere' does not exist"):
    io.kind_of(tmp_path / "nowhere", "init.path")
  with pytest.raises(FileNotFoundError, match="neither an mmjax workdir .* nor a Hugging Face"):
    io.kind_of(tmp_path)


@pytest.fixture
def tiny_workdir(demo_tiny_run):
  """demo:tiny trained 20 steps (conftest's shared run) and its config; read only."""
  return demo_tiny_run[0], mmjax.load_config("demo:tiny")


def test_load_workdir_has_what_a_reader_needs(tiny_workdir):
  wd, config = tiny_workdir
  got = io.load(wd)
  assert got.kind == "workdir" and got.step == 20 and got.hf_config is None
  assert (wd / "tokenizer.json").is_file()                      # every run saves its tokenizer
  model = got.model()
  ids, mask = got.tokenizer.encode(["a small red circle"], config.data.max_len)
  emb, _ = model.apply({"params": got.params}, ids, mask, method="encode_text")
  assert emb.shape == (1, config.model.embed_dim)
  assert io.load(wd, params=False).params is None


def test_workdir_preprocess_is_the_pipelines_eval_transform(tiny_workdir):
  wd, config = tiny_workdir
  got = io.load(wd, params=False)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in ((32, 32), (50, 40))]

  class Source:
    label_names = {}

    def __len__(self):
      return len(images)

    def __getitem__(self, i):
      return {"image": images[i], "caption": "a red circle"}

  batch = next(make_iterator(config.data, "test", batch_size=2, train=False,
                             tokenizer=got.tokenizer, source=Source()))
  np.testing.assert_allclose(got.preprocess.batch([Image.fromarray(im) for im in images]),
                             batch["image"], atol=1e-6)


def test_eval_of_a_mistyped_workdir_creates_nothing(tmp_path, capsys):
  assert cli.main(["eval", "--workdir", str(tmp_path / "typo")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert not (tmp_path / "typo").exists()


def test_convert_names_a_malformed_config_json(tmp_path, capsys):
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text('{"architectures": ["ViTModel"], ')
  (hf / "model.safetensors").write_bytes(b"")
  assert cli.main(["convert", "--from-hf", str(hf), "--to", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert f"{hf / 'config.json'}: malformed JSON" in err and "Traceback" not in err
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, message", [
    ("--config.total_steps=-5", "total_steps=-5: expected an integer >= 1"),
    ("--config.total_steps=0", "total_steps=0: expected an integer >= 1"),
    ("--config.optim.lr=0.0", "optim.lr=0.0"),
    ("--config.batch_size=0", "batch_size=0"),
    ("--config.model.dropout=1.5", "model.dropout=1.5"),
])
def test_train_with_a_bad_number_fails_first_and_creates_nothing(tmp_path, capsys, override,
                                                                 message):
  wd = tmp_path / "run"
  assert cli.main(["train", "--config", "demo:tiny", "--workdir", str(wd), override,
                   "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err
  assert not wd.exists()


def test_convert_names_an_unreadable_safetensors_file(tmp_path, capsys):
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text('{"architectures": ["ViTModel"], "model_type": "vit"}')
  (hf / "model.safetensors").write_bytes(b"not a safetensors file")
  assert cli.main(["convert", "--from-hf", str(hf), "--to", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert f"{hf / 'model.safetensors'}: not a readable safetensors file" in err
  assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_failed_read_prints_its_warnings_and_no_tracebacks(tmp_path):
  """When one array of a step fails to read, Orbax abandons the step's other reads; as they
  finish they report to a closed event loop (one RuntimeError traceback, and one asyncio
  "exception was never retrieved" log each). Checkpointer drops exactly those: stderr has
  the one-line warnings and nothing else, while an unrelated unraisable exception and an
  unrelated asyncio error still get through."""
  code = f"""
import asyncio, gc, logging, pathlib, sys, time
sys.path.insert(0, "tests")
from test_io import _saved, _corrupt, _state
from mmjax import io
logging.basicConfig()
path = pathlib.Path({str(tmp_path)!r})
_saved(path)
for s in (1, 2):
  _corrupt(path, s)
try:
  io.Checkpointer(path, keep=5, read_only=True).restore(_state())
except io.UnreadableCheckpoint as e:
  print("one-line:", str(e).splitlines()[0])
time.sleep(1)
gc.collect()
class Other:
  def __del__(self):
    raise RuntimeError("unrelated error in __del__")
Other()
gc.collect()
loop = asyncio.new_event_loop()
loop.create_future().set_exception(ValueError("unrelated future error"))
gc.collect()
"""
  r = run_python(code)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "one-line: no readable checkpoint" in r.stdout
  err = r.stderr.splitlines()
  warnings = [line for line in err if "is unreadable" in line]
  assert len(warnings) == 2, r.stderr[-3000:]
  assert "Event loop is closed" not in r.stderr
  assert "Future exception was never retrieved" in r.stderr    # the unrelated one only
  assert r.stderr.count("never retrieved") == 1 and "unrelated future error" in r.stderr
  assert "unrelated error in __del__" in r.stderr
  assert r.stderr.count("Traceback") <= 2, r.stderr[-3000:]     # the two unrelated ones
