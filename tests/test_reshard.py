"""Resharding restore: a checkpoint written on one mesh restores onto another (fewer
devices, a different split of the params, one device) with equal params and optimizer
state, and training continues from it."""
import pytest

from conftest import run_python


@pytest.mark.slow
def test_checkpoint_from_data_8_restores_onto_other_meshes_and_trains_on(tmp_path):
  code = r"""
import json, jax, numpy as np, mmjax
from jax.sharding import PartitionSpec as P
from mmjax.train.loop import checkpointer, setup
workdir = WORKDIR
size = [f"--config.model.{t}.{k}={v}" for t in ("image", "text")
        for k, v in (("width", 32), ("heads", 2), ("depth", 1), ("mlp_dim", 64))]
base = ["--config.batch_size=8", "--config.total_steps=2", "--config.log_every=1",
        "--config.evals={}", "--config.model.text.vocab_size=256",
        "--config.model.embed_dim=32"] + size
mmjax.train(mmjax.load_config("configs/bench.py", base + ["--config.mesh.data=8"]), workdir,
            progress=False)

def restored(overrides, devices):
  c = mmjax.load_config("configs/bench.py", base + overrides)
  run = setup(c, devices=devices)
  ckpt = checkpointer(run.config, workdir)
  state, _, step = ckpt.restore(run.abstract)
  ckpt.close()
  assert step == 2, step
  return run, state

_, written = restored(["--config.mesh.data=8"], jax.devices())
want = jax.device_get(written)
meshes = {
    # (data -1: the config check counts this process's 8 devices; setup gets 4 or 1.)
    "data4": (["--config.mesh.data=-1"], jax.devices()[4:]),
    "fsdp8": (["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.sharding.tactic=fsdp",
               "--config.sharding.min_size_mb=0.005"], jax.devices()),
    "one": (["--config.mesh.data=-1"], jax.devices()[:1]),
}
for name, (overrides, devices) in meshes.items():
  run, state = restored(overrides, devices)
  fc1 = state.params["image_tower"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.device_set == set(devices), name
  if name == "fsdp8":
    assert fc1.sharding.spec == P(None, "fsdp"), fc1.sharding.spec
  got = jax.device_get(state)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y)
  print("restored", name)

# The loop resumes on the new mesh: mmjax.train on (fsdp 8) continues to step 3.
c = mmjax.load_config("configs/bench.py", base + meshes["fsdp8"][0] + ["--config.total_steps=3"])
result = mmjax.train(c, workdir, progress=False)
assert result["steps"] == 3, result
rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
last = [r for r in rows if r.get("kind") == "train"][-1]
assert last["step"] == 3 and np.isfinite(last["loss"]), last
print("trained on", result["steps"])
"""
  r = run_python(code.replace("WORKDIR", repr(str(tmp_path / "wd"))), devices=8)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("restored") == 3 and "trained on 3" in r.stdout, r.stdout
