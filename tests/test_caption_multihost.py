"""Generation evaluators on two processes on 127.0.0.1: each decodes its share of the
held-out images, and both report what one process reports over all of them."""
import json
import shutil
import subprocess
import sys

import jax
import pytest

from conftest import ROOT, cli
from test_multiprocess import _env, _free_port

CONFIG = ["--config", "configs/caption_shapes.py:tiny"]
# 40 held-out images in global batches of 16 (8 per process): the third batch is half
# padding. `first` stops after 21 examples, inside the second batch.
EVAL = ["--config.data.eval_size=40", "--config.eval_batch_size=16",
        "--config.evals={'caption': {'type': 'captioning', 'split': 'test'}, "
        "'first': {'type': 'captioning', 'split': 'test', 'examples': 21}}"]


def _metrics(stdout):
  """The evaluators' metrics of a run's result line (not its wall time)."""
  result = json.loads(stdout.splitlines()[-1])
  return {k: v for k, v in result.items() if k.startswith(("caption_", "first_"))}


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_evaluate_captions_like_one(tmp_path):
  trained = tmp_path / "trained"
  got = cli("train", *CONFIG, "--workdir", str(trained), "--config.evals={}")
  assert got.returncode == 0, got.stderr[-3000:]
  one, two = tmp_path / "one", tmp_path / "two"
  shutil.copytree(trained, one)
  shutil.copytree(trained, two)
  # `mmjax eval` on two processes (each reads the whole checkpoint onto its host) against
  # `mmjax eval` on one: the same params.
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "mmjax.cli", "eval", "--workdir", str(two), *CONFIG, *EVAL,
       f"--config.distributed.coordinator=127.0.0.1:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert jax.process_count() == 1          # the reference: this worker's one process
  ref = cli("eval", "--workdir", str(one), *CONFIG, *EVAL)
  assert ref.returncode == 0, ref.stderr[-3000:]
  want = _metrics(ref.stdout)
  assert len(want) == 16 and 0 < want["caption_bleu"] < 100     # a partly trained model
  for out, _ in outs:
    assert _metrics(out) == want
  # Every example once, in split order, from the gathered rows.
  rows = {name: _lines(two / "reports" / f"{name}_generated.jsonl")
          for name in ("caption", "first")}
  for name, got in rows.items():
    assert got == _lines(one / "reports" / f"{name}_generated.jsonl")
  assert len(rows["caption"]) == 40 and rows["first"] == rows["caption"][:21]
