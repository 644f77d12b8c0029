import contextlib
import fcntl
import io as text_io
import json
import logging
import os
import pathlib
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# JAX's persistent compilation cache, shared by the test workers and the subprocesses
# they start: most tests train the same tiny configs, and XLA:CPU compiling their train
# step (~10 s) costs far more than running it. A cached executable is the compiled one,
# so results do not change. Set before jax is first imported (the env var is read then).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(ROOT / ".pytest_cache" / "jax-compilation-cache"))

# XLA:CPU's LLVM backend at -O0, in the test workers and in the interpreters the tests
# start (`xla_flags`): nearly every test compiles a few programs and runs each for a few
# steps, and compiling at the default -O2 takes 2-4x as long (demo:tiny's train step with
# dropout: 20-38 s -> 7-10 s on 2 cores) while the steps run only ~2x faster. XLA's own
# (HLO) passes are the same at every level, so results do not change: the demo's metrics
# after 60 steps are equal bit for bit. The few tests that run long (hundreds of steps; a
# ResNet's run ~5x slower at -O0; a B/16, whose elementwise code -O0 leaves slow) do so in
# an interpreter of their own at -O2: `run_python(..., optimize=True)`. XLA_FLAGS is read
# when JAX first makes its backend, after this file is imported; flags the caller set are
# kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()


def xla_flags(devices: int = 1, optimize: bool = False) -> str:
  """XLA_FLAGS for a fresh interpreter: `devices` CPU devices, the backend at -O0 (at
  XLA's default -O2 with `optimize`, for a run of many steps)."""
  return (f"--xla_force_host_platform_device_count={devices} "
          f"--xla_backend_optimization_level={2 if optimize else 0}")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
  """Built-in data and tokenizers are cached per test session, not in ~/.cache."""
  os.environ.setdefault("MMJAX_CACHE", str(tmp_path_factory.mktemp("mmjax_cache")))


def run_python(code: str, *, devices: int = 1, timeout: int = 600, env=None,
               optimize: bool = False):
  """Run `code` in a fresh interpreter (own JAX runtime, own device count, -O0 or with
  `optimize` -O2; see `xla_flags`)."""
  import subprocess
  e = dict(os.environ, XLA_FLAGS=xla_flags(devices, optimize), PYTHONPATH=str(ROOT),
           **(env or {}))
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=timeout, env=e, cwd=ROOT)


def cli(*args):
  """`mmjax ARGS` in this process: what a subprocess would print, without paying for a
  fresh interpreter and JAX runtime per call (each run still builds its own jitted
  functions; their executables come from the compilation cache). The root logger that
  `main` reconfigures onto the captured stderr is put back afterwards."""
  from mmjax import cli as mmjax_cli  # pylint: disable=g-import-not-at-top
  out, err = text_io.StringIO(), text_io.StringIO()
  root = logging.getLogger()
  handlers, level = root.handlers[:], root.level
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = mmjax_cli.main([*args, "--no-progress"])
  finally:
    root.handlers[:] = handlers
    root.setLevel(level)
  return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def read_workdir(path, step=None):
  """(config, params, step) of a workdir, through the one loader."""
  from mmjax import io  # pylint: disable=g-import-not-at-top
  got = io.load(path, step)
  return got.config, got.params, got.step


def shared_run(tmp_path_factory, name: str, train) -> tuple[pathlib.Path, dict]:
  """(workdir, what `train(workdir)` returned): a run several tests read, trained once
  per test session. The xdist workers share it through their common temporary folder:
  the first to ask trains it under a lock, the others wait for it. (Grouping its tests
  on one worker would not do: with pytest 9, `--dist loadgroup` ignores xdist_group
  marks, pytest-dev/pytest-xdist#1386.) Tests that write to the workdir copy it first."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent              # <basetemp>/popen-gwN -> the run's own basetemp
  workdir, done = root / f"shared_{name}", root / f"shared_{name}.json"
  with open(root / f"shared_{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      done.write_text(json.dumps(train(workdir)))
  return workdir, json.loads(done.read_text())


@pytest.fixture(scope="session")
def digits_tiny_workdir(tmp_path_factory):
  """finetune_digits:tiny trained without evals: the checkpoint the fine-tune tests of
  several modules start from."""
  import mmjax  # pylint: disable=g-import-not-at-top
  config = mmjax.load_config("finetune_digits:tiny", ["--config.evals={}"])
  return shared_run(tmp_path_factory, "digits_tiny",
                    lambda wd: mmjax.train(config, wd, progress=False))[0]


def pytest_collection_modifyitems(items):
  """The few slow end-to-end tests first: the workers then finish together instead of
  one running a long test alone at the end."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def serve_workdir(tmp_path_factory):
  """An untrained caption_shapes:tiny workdir (image tower, causal text tower that
  cross-attends to it, joint embedding) with a 3-class image classifier and class names:
  a model with every route `mmjax serve` has (embeddings, zero-shot, classify, caption)."""
  def build(workdir):
    import ml_collections  # pylint: disable=g-import-not-at-top
    import mmjax  # pylint: disable=g-import-not-at-top
    from mmjax.data.tokenizer import train_wordpiece  # pylint: disable=g-import-not-at-top
    from mmjax.io import hf, workdir as workdirs  # pylint: disable=g-import-not-at-top
    from mmjax.io.loading import special_ids  # pylint: disable=g-import-not-at-top
    from mmjax.train.state import initial_state  # pylint: disable=g-import-not-at-top
    config = mmjax.load_config("caption_shapes:tiny", ["--config.evals={}"])
    with config.unlocked():
      config.model.classifier = ml_collections.ConfigDict(dict(num_classes=3, input="image"))
    tok = train_wordpiece(["a small red circle", "a big blue square left of a green triangle",
                           "a cat", "a dog"] * 4, 64)
    model = mmjax.build_model(config, tok.vocab_size, special_ids(tok))
    workdirs.write_workdir(workdir, config, initial_state(config, hf.init_params(model, config)),
                           {}, tok)
    workdirs.write_label_names(workdir, {"label": ["circle", "square", "triangle"]})
    return {}
  return shared_run(tmp_path_factory, "serve_tiny", build)[0]


# demo:tiny for 20 steps, checkpointed at the end only: `demo_tiny_run` trains it once, for
# the tests (test_train, test_io) that read a trained demo:tiny workdir; the resume test's
# reference.
DEMO_TWENTY = ["--config", "demo:tiny", "--config.log_every=5", "--config.total_steps=20",
               "--config.checkpoint_every=0"]


@pytest.fixture(scope="session")
def demo_tiny_run(tmp_path_factory):
  """(workdir, the JSON line `mmjax train` printed) of DEMO_TWENTY, with demo:tiny's
  evals."""
  def train(wd):
    r = cli("train", "--workdir", str(wd), *DEMO_TWENTY)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])
  return shared_run(tmp_path_factory, "demo_tiny", train)
