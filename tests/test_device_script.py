"""scripts/device: bench.sh is valid bash and refuses unknown arguments; wheels.txt pins
one version of each package (two versions of one stop the device's pip install)."""
import re
import subprocess

from conftest import ROOT

DEVICE = ROOT / "scripts" / "device"


def test_bench_is_valid_bash_and_refuses_unknown_arguments():
  assert subprocess.run(["bash", "-n", str(DEVICE / "bench.sh")]).returncode == 0
  got = subprocess.run(["bash", str(DEVICE / "bench.sh"), "--fast"], capture_output=True,
                       text=True, timeout=30)
  assert got.returncode == 2 and "--fast" in got.stderr, got.stderr


def test_every_wheel_is_pinned_once():
  names = []
  for line in (DEVICE / "wheels.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][A-Za-z0-9.]*", line), line
      names.append(re.sub(r"[-_.]+", "-", line.split("==")[0]).lower())
  assert names and len(names) == len(set(names)), names
