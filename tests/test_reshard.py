"""Resharding restore: a checkpoint written on one mesh restores onto another (fewer
devices, a different split of the params, one device) with equal params and optimizer
state, and training continues from it as the uninterrupted run on the original mesh
does: the same loss at each step (<= 1e-5)."""
import pytest

from conftest import run_python


@pytest.mark.slow
def test_checkpoint_from_data_8_restores_onto_other_meshes_and_trains_on(tmp_path):
  code = r"""
import json, jax, numpy as np, mmjax
from jax.sharding import PartitionSpec as P
from mmjax import data as mmdata, parallel
from mmjax.train.loop import checkpointer, make_step, setup
workdir = WORKDIR
size = [f"--config.model.{t}.{k}={v}" for t in ("image", "text")
        for k, v in (("width", 32), ("heads", 2), ("depth", 1), ("mlp_dim", 64))]
base = ["--config.batch_size=8", "--config.log_every=1", "--config.evals={}",
        "--config.model.text.vocab_size=256", "--config.model.embed_dim=32",
        "--config.model.tower_splits=1", "--config.optim.schedule=constant",
        "--config.optim.warmup_steps=0"] + size      # lr 1e-4 at every step
# The uninterrupted run: 4 steps on (data 8), a checkpoint at step 2 kept, every loss logged.
mmjax.train(mmjax.load_config("configs/bench.py", base + [
    "--config.mesh.data=8", "--config.total_steps=4", "--config.checkpoint_every=2",
    "--config.keep_checkpoints=2"]), workdir, progress=False)
rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
rows = [r for r in rows if r.get("kind") == "train"]
assert [r["step"] for r in rows] == [1, 2, 3, 4], rows
want_losses = np.array([r["loss"] for r in rows[2:]])        # steps 3 and 4

def restored(overrides, devices, step=2):
  c = mmjax.load_config("configs/bench.py", base + ["--config.total_steps=4"] + overrides)
  run = setup(c, devices=devices)
  ckpt = checkpointer(run.config, workdir)
  state, data_state, got_step = ckpt.restore(run.abstract, step)
  ckpt.close()
  assert got_step == step, got_step
  return run, state, data_state

run, written, data_state = restored(["--config.mesh.data=8"], jax.devices())
want = jax.device_get(written)
want_params = jax.device_get(restored(["--config.mesh.data=8"], jax.devices(), 4)[1].params)
# The batches of steps 3 and 4: the train iterator from where the step-2 checkpoint left it.
c = run.config
iterator = mmdata.make_iterator(c.data, "train", batch_size=c.batch_size, train=True,
                                tokenizer=run.tokenizer, source=run.sources.get(c.data, "train"))
iterator.set_state(data_state["iterator"])
batches = [next(iterator) for _ in range(2)]

meshes = {
    # (data -1: the config check counts this process's 8 devices; setup gets 4 or 1.)
    "data4": (["--config.mesh.data=-1"], jax.devices()[4:]),
    "fsdp8": (["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.sharding.tactic=fsdp",
               "--config.sharding.min_size_mb=0.005"], jax.devices()),
    "one": (["--config.mesh.data=-1"], jax.devices()[:1]),
}
for name, (overrides, devices) in meshes.items():
  run, state, _ = restored(overrides, devices)
  fc1 = state.params["image_tower"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.device_set == set(devices), name
  if name == "fsdp8":
    assert fc1.sharding.spec == P(None, "fsdp"), fc1.sharding.spec
  got = jax.device_get(state)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y)
  # Steps 3 and 4 on this mesh; step 4's loss is the first computed with params updated here.
  step_fn, losses = make_step(run), []
  for batch in batches:
    state, metrics = step_fn(state, parallel.device_batch(batch, run.mesh))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, want_losses, rtol=0, atol=1e-5, err_msg=name)
  # Params: within one AdamW update (lr 1e-4) per step. Where a gradient is ~0, Adam's
  # m / sqrt(v) turns the last bits of a differently ordered sum into a sizeable part of
  # the update, so the params agree to the update size, not to 1e-5.
  for x, y in zip(jax.tree.leaves(want_params), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_allclose(x, y, rtol=0, atol=2e-4, err_msg=name)
  print("restored and trained on", name, losses)

# The loop resumes on a new mesh: mmjax.train on (fsdp 8) continues from step 4 to 5.
c = mmjax.load_config("configs/bench.py", base + meshes["fsdp8"][0] + ["--config.total_steps=5"])
result = mmjax.train(c, workdir, progress=False)
assert result["steps"] == 5, result
rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
last = [r for r in rows if r.get("kind") == "train"][-1]
assert last["step"] == 5 and np.isfinite(last["loss"]), last
print("trained on", result["steps"])
"""
  r = run_python(code.replace("WORKDIR", repr(str(tmp_path / "wd"))), devices=8)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("restored and trained on") == 3 and "trained on 5" in r.stdout, r.stdout
