"""Two processes on 127.0.0.1 form one JAX runtime and train like one process."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import mmjax
from mmjax.io import Checkpointer
from mmjax.train.loop import setup

from conftest import ROOT, cli, xla_flags

ARGS = ["--config", "demo:tiny", "--config.evals={}", "--config.total_steps=6",
        "--config.log_every=3", "--config.checkpoint_every=0", "--config.batch_size=8",
        "--config.objectives={'contrastive': 1.0}", "--no-progress",
        # SGD: Adam would turn float noise in near-zero gradients into lr-sized steps.
        "--config.optim.name=sgd", "--config.optim.lr=0.05", "--config.optim.warmup_steps=0"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  return dict(os.environ, XLA_FLAGS=xla_flags(devices=1),
              PYTHONPATH=str(ROOT))


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "mmjax.cli", "train", "--workdir", str(tmp_path / "two"), *ARGS,
       f"--config.distributed.coordinator=127.0.0.1:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert json.loads(outs[0][0].splitlines()[-1])["steps"] == 6
  # The single-process reference runs here: this worker's JAX is one process, one device.
  assert jax.process_count() == 1 and jax.device_count() == 1
  one = cli("train", "--workdir", str(tmp_path / "one"), *ARGS)
  assert one.returncode == 0, one.stderr[-3000:]
  # Process 0 alone writes metrics; the losses match the single-process run.
  loss = lambda d: [r["loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl")
                                           .read_text().splitlines()) if r["kind"] == "train"]
  np.testing.assert_allclose(loss("two"), loss("one"), rtol=1e-5)
  config = mmjax.load_config("demo:tiny", [a for a in ARGS if a.startswith("--config.")])
  target = setup(config).abstract     # shapes and shardings: nothing is initialised
  two, _, _ = Checkpointer(tmp_path / "two", keep=2).restore(target)
  one, _, _ = Checkpointer(tmp_path / "one", keep=2).restore(target)
  for a, b in zip(jax.tree.leaves(two.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
