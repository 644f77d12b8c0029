import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# JAX's persistent compilation cache, shared by the test workers and the subprocesses
# they start: most tests train the same tiny configs, and XLA:CPU compiling their train
# step (~10 s) costs far more than running it. A cached executable is the compiled one,
# so results do not change. Set before jax is first imported (the env var is read then).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(ROOT / ".pytest_cache" / "jax-compilation-cache"))


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
  """Built-in data and tokenizers are cached per test session, not in ~/.cache."""
  os.environ.setdefault("MMJAX_CACHE", str(tmp_path_factory.mktemp("mmjax_cache")))


def run_python(code: str, *, devices: int = 1, timeout: int = 600, env=None):
  """Run `code` in a fresh interpreter (own JAX runtime, own device count)."""
  import subprocess
  e = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
           PYTHONPATH=str(ROOT), **(env or {}))
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=timeout, env=e, cwd=ROOT)


def read_workdir(path, step=None):
  """(config, params, step) of a workdir, through the one loader."""
  from mmjax import io  # pylint: disable=g-import-not-at-top
  got = io.load(path, step)
  return got.config, got.params, got.step


def pytest_collection_modifyitems(items):
  """The few slow end-to-end tests first: the workers then finish together instead of
  one running a long test alone at the end."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
