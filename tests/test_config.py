import subprocess
import sys

import jax.numpy as jnp
import optax
import pytest

from mmjax.config import ConfigError, base_config, load_config
from mmjax.train.optimizer import OPTIMIZERS, SCHEDULES, make_optimizer, make_schedule

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


# config.optim -> optax: optimizers and schedules are looked up by name.

def _optim(**fields):
  o = base_config().optim
  o.update(fields)
  return o


def test_unknown_optimizer_and_schedule_name_the_known_ones():
  params = {"w": jnp.ones(3)}
  with pytest.raises(ConfigError, match=r"optim.name='adamx': expected one of "
                                        r"\['adamw', 'lion', 'sgd'\]"):
    make_optimizer(_optim(name="adamx"), params, 10)
  with pytest.raises(ConfigError, match=r"optim.schedule='cosin': expected one of "
                                        r"\['constant', 'cosine', 'linear'\]"):
    make_schedule(_optim(schedule="cosin"), 10)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_registered_optimizer_steps_downhill(name):
  params = {"w": jnp.ones(3)}
  tx, _ = make_optimizer(_optim(name=name, warmup_steps=0, weight_decay=0.0), params, 10)
  updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  assert (updates["w"] < 0).all()


@pytest.mark.parametrize("schedule, halfway", [("cosine", 0.5), ("linear", 0.5),
                                               ("constant", 1.0)])
def test_every_registered_schedule(schedule, halfway):
  assert set(SCHEDULES) == {"cosine", "linear", "constant"}
  rate = make_schedule(_optim(lr=1.0, warmup_steps=2, schedule=schedule), 12)
  assert float(rate(1)) == pytest.approx(0.5)          # warming up
  assert float(rate(2)) == pytest.approx(1.0)
  assert float(rate(7)) == pytest.approx(halfway)       # halfway through the 10 after warmup


def test_accumulated_updates_follow_the_schedule_by_train_step():
  """accum_steps=2 over 8 train steps: 4 updates, at the rates of steps 0, 2, 4, 6 (the
  schedule spans the run, not 8 updates), so the logged rate is the applied one."""
  o = _optim(name="sgd", momentum=0.0, lr=1.0, schedule="linear", warmup_steps=0,
             weight_decay=0.0, clip_norm=0.0, accum_steps=2)
  params = {"w": jnp.zeros(())}
  tx, rate = make_optimizer(o, params, 8)
  state = tx.init(params)
  for _ in range(8):
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    params = optax.apply_updates(params, updates)
  assert float(params["w"]) == pytest.approx(-sum(float(rate(s)) for s in (0, 2, 4, 6)))
  assert float(params["w"]) == pytest.approx(-2.5)     # 1 + 0.75 + 0.5 + 0.25
