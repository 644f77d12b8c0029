import subprocess
import sys

import pytest

from mmjax.config import ConfigError, load_config

from conftest import ROOT


def test_overrides_are_typed():
  c = load_config("demo:tiny", ["--config.optim.lr=3e-4", "--config.total_steps=7",
                                "--config.data.num_objects=(1,1)",
                                "--config.model.fusion.mode=merged"])
  assert c.optim.lr == 3e-4 and c.total_steps == 7
  assert c.data.num_objects == (1, 1) and c.model.fusion.mode == "merged"


@pytest.mark.parametrize("override, message", [
    ("--config.optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("--config.totl_steps=5", "did you mean 'total_steps'?"),
    ("--config.total_steps=abc", "cannot parse as int"),
    ("--config.total_steps=1.5", "expected int"),
])
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
    load_config("demo:tiny", [override])


def test_config_is_locked():
  c = load_config("demo:tiny")
  with pytest.raises(AttributeError):
    c.not_a_key = 1


def test_cli_rejects_wrong_key_before_any_compute(tmp_path):
  r = subprocess.run([sys.executable, "-m", "mmjax.cli", "train", "--config", "demo:tiny",
                      "--workdir", str(tmp_path / "w"), "--config.optim.learning_rate=1"],
                     capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode == 2
  assert "unknown config key 'optim.learning_rate'" in r.stderr
  assert not (tmp_path / "w").exists()


def test_missing_config_file_lists_builtins():
  with pytest.raises(ConfigError, match="does not exist.*demo"):
    load_config("configs/nope.py")
