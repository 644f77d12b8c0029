"""scripts/tpu and scripts/gpu: valid bash, and --dry-run prints the commands they would run."""
import os
import shlex
import subprocess

import pytest

from conftest import ROOT

TPU = ("create", "setup", "run", "logs", "stop", "delete")
ENV = dict(TPU_NAME="mm", ZONE="us-central2-b", PROJECT="proj", ACCELERATOR_TYPE="v4-32",
           RUNTIME_VERSION="tpu-ubuntu2204-base")


def _run(script, *args, **env):
  return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], capture_output=True,
                        text=True, timeout=60, cwd=ROOT,
                        env=dict({k: v for k, v in os.environ.items() if k not in ENV}, **env))


def _commands(result) -> list[list[str]]:
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("path", [*(f"tpu/{s}.sh" for s in TPU), "tpu/common.sh",
                                  "gpu/train.sbatch"])
def test_scripts_are_valid_bash(path):
  result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / path)], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr


def test_tpu_dry_runs_print_the_gcloud_commands():
  create = _commands(_run("tpu/create.sh", "--dry-run", "--spot", **ENV))
  assert create[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {"mm-qr", "--node-id=mm", "--accelerator-type=v4-32", "--zone=us-central2-b",
          "--project=proj", "--spot", "--runtime-version=tpu-ubuntu2204-base"} <= set(create[0])

  setup = _commands(_run("tpu/setup.sh", "--dry-run", BUCKET="bk", **ENV))
  assert setup[0][:4] == ["python3", "-m", "pip", "wheel"]
  assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and "--worker=all" in c
             for c in setup[1:])
  install = setup[3][-1]
  assert "[tpu]" in install and "gcsfs" in install and "gcsfuse" in setup[4][-1]

  train = ["--config", "configs/clip_b16.py", "--workdir", "/mnt/gcs/bk/runs/x",
           "--config.data.shards=gs://bk/{00000..00009}.tar"]
  (run,) = _commands(_run("tpu/run.sh", "--dry-run", "--", *train, **ENV))
  assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mm"] and "--worker=all" in run
  remote = run[-1].removeprefix("--command=")
  # The remote shell gets the train arguments back intact, plus distributed.auto.
  assert shlex.split(remote)[3:13] == ["nohup", "python3", "-m", "mmjax.cli", "train", *train]
  assert "--config.distributed.auto=True" in remote and "mmjax-train.log" in remote

  (logs,) = _commands(_run("tpu/logs.sh", "--dry-run", WORKER="3", **ENV))
  assert "--worker=3" in logs and "mmjax-train.log" in logs[-1]
  (stop,) = _commands(_run("tpu/stop.sh", "--dry-run", **ENV))
  assert "--worker=all" in stop and "kill" in stop[-1]
  (delete,) = _commands(_run("tpu/delete.sh", "--dry-run", **ENV))
  assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "mm-qr"]


def test_tpu_scripts_name_what_is_missing():
  result = _run("tpu/create.sh", "--dry-run", TPU_NAME="mm", ZONE="z")
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip() == "create.sh: set ACCELERATOR_TYPE (see scripts/tpu/common.sh)"
  result = _run("tpu/run.sh", "--dry-run", **ENV)
  assert result.returncode == 2 and "give the mmjax train arguments" in result.stderr


def test_sbatch_runs_one_process_per_gpu_with_distributed_auto():
  text = (ROOT / "scripts" / "gpu" / "train.sbatch").read_text()
  assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
  (srun,) = _commands(_run("gpu/train.sbatch", "--dry-run", "--config", "configs/clip_b16.py",
                           "--workdir", "/shared/runs/x"))
  assert srun[0] == "srun" and srun[srun.index("python3"):] == [
      "python3", "-m", "mmjax.cli", "train", "--config", "configs/clip_b16.py", "--workdir",
      "/shared/runs/x", "--config.distributed.auto=True", "--no-progress"]
  assert _run("gpu/train.sbatch", "--dry-run").returncode == 2

