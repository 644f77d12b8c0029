"""Magnitude pruning (config.finetune.prune): the cubic schedule, exact sparsity per scope,
masks that hold through optimizer updates, and a pruned fine-tune whose checkpoint holds
the zeros that `mmjax eval` reports."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import cli

import mmjax
from mmjax.io.trees import flat
from mmjax.tuning.prune import Pruner, apply_masks, measured_sparsity

TARGETS = r"/encoder/.*/kernel$"


def pruner(**kw):
  ft = ml_collections.ConfigDict(dict(prune=dict(dict(sparsity=0.8, targets=TARGETS), **kw)))
  return Pruner.from_config(ft, total_steps=200)


def toy_params(seed=0):
  """Two 'layers' of different scale (global scope prunes the small one more)."""
  r = np.random.default_rng(seed)
  return {"tower": {"encoder": {"block_0": {"kernel": jnp.asarray(r.normal(size=(16, 24)),
                                                                   jnp.float32)},
                                "block_1": {"kernel": jnp.asarray(3 * r.normal(size=(24, 8)),
                                                                  jnp.float32),
                                            "bias": jnp.ones(8)}}},
          "head": {"kernel": jnp.asarray(r.normal(size=(8, 2)), jnp.float32)}}


def test_gradual_schedule_is_cubic_and_held():
  p = pruner(begin_step=10, end_step=110)
  s = lambda t: float(p.sparsity_at(t))
  assert s(0) == 0.0 and s(9) == 0.0 and s(10) == 0.0
  np.testing.assert_allclose(s(60), 0.8 * (1 - 0.5 ** 3), rtol=1e-6)     # 0.7
  np.testing.assert_allclose(s(35), 0.8 * (1 - 0.75 ** 3), rtol=1e-6)
  assert s(110) == pytest.approx(0.8) and s(150) == pytest.approx(0.8)
  assert [bool(p._updating(t)) for t in (9, 10, 110, 111)] == [False, True, True, False]
  one = pruner(schedule="oneshot", begin_step=5)
  assert [float(one.sparsity_at(t)) for t in (4, 5, 100)] == [0.0, pytest.approx(0.8),
                                                                pytest.approx(0.8)]
  assert pruner(end_step=0).end_step == 200        # 0: the run's last step
  with pytest.raises(ValueError, match="end_step"):
    pruner(begin_step=50, end_step=20)
  with pytest.raises(ValueError, match="unknown keys"):
    pruner(sparsty=0.5)
  assert Pruner.from_config(ml_collections.ConfigDict(dict(prune=dict(sparsity=0.0))), 10) is None


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_measured_sparsity_equals_target_per_scope(sparsity):
  params = toy_params()
  names = ["tower/encoder/block_0/kernel", "tower/encoder/block_1/kernel"]
  layer = pruner(sparsity=sparsity, scope="layer")
  masks = flat(layer.new_masks(params, jnp.float32(sparsity)))
  assert sorted(masks) == names                            # the head is not a target
  for n in names:                                          # each layer exactly
    size = masks[n].size
    assert int((~masks[n]).sum()) == round(sparsity * size)
  glob = pruner(sparsity=sparsity, scope="global")
  masks = flat(glob.new_masks(params, jnp.float32(sparsity)))
  total = sum(m.size for m in masks.values())
  assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
  # Global: one ranking, so the small-scale layer loses more than the large one.
  frac = {n: float((~m).mean()) for n, m in masks.items()}
  assert frac[names[0]] > sparsity > frac[names[1]]
  # What is pruned is the smallest magnitudes.
  w = np.abs(np.asarray(params["tower"]["encoder"]["block_0"]["kernel"]))
  m = np.asarray(masks[names[0]])
  assert w[~m].max() <= w[m].min()
  pruned = apply_masks(params, glob.new_masks(params, jnp.float32(sparsity)))
  got = measured_sparsity(pruned, TARGETS)["prune_sparsity"]
  assert got == pytest.approx(round(sparsity * total) / total)


def test_masks_hold_through_updates():
  """Adam would move every weight; the pruned ones stay exactly 0 and the masks only grow
  along the ramp, then hold."""
  p = pruner(sparsity=0.5, scope="layer", begin_step=2, end_step=6)
  params = toy_params()
  masks = p.init_masks(params)
  tx = optax.adam(0.05)
  opt = tx.init(params)
  target = jax.tree.map(lambda x: jnp.full_like(x, 2.0), params)    # pulls all away from 0

  @jax.jit
  def step(params, opt, masks, t):
    grads = jax.grad(lambda q: sum(jnp.sum((a - b) ** 2) for a, b in
                                   zip(jax.tree.leaves(q), jax.tree.leaves(target))))(params)
    updates, opt = tx.update(grads, opt, params)
    params, masks = p(optax.apply_updates(params, updates), masks, t)
    return params, opt, masks

  history = []
  for t in range(1, 13):
    params, opt, masks = step(params, opt, masks, jnp.int32(t))
    history.append(flat(jax.device_get(masks)))
    for name, m in history[-1].items():
      w = np.asarray(flat(params)[name])
      assert (w[~m] == 0).all(), (t, name)                # exactly 0, not small
  for before, after in zip(history, history[1:]):         # pruned once, pruned for good
    for name in before:
      assert not (after[name] & ~before[name]).any()
  final = history[-1]
  for name, m in final.items():
    assert int((~m).sum()) == round(0.5 * m.size)
  assert all((history[5][n] == final[n]).all() for n in final)   # held after end_step 6
  assert np.asarray(flat(params)["head/kernel"]).all()    # untargeted: never zeroed


@pytest.mark.slow
def test_pruned_finetune_saves_zeros_and_eval_reports_them(digits_tiny_workdir, tmp_path):
  work = tmp_path / "pruned"
  r = cli("finetune", "--config", "finetune_digits:tiny", "--init", str(digits_tiny_workdir),
          "--workdir", str(work), "--config.finetune.prune.sparsity=0.6",
          "--config.finetune.prune.scope=layer", "--config.finetune.prune.end_step=4",
          "--config.evals={}")
  assert r.returncode == 0, r.stderr
  got = mmjax.load(work)
  kernels = {k: np.asarray(v) for k, v in flat(got.params).items()
             if "/encoder/" in k and k.endswith("/kernel")}
  assert kernels
  for name, w in kernels.items():       # steps 5-8 updated the weights; masks held
    assert (w == 0).sum() == round(0.6 * w.size), name
  assert np.count_nonzero(np.asarray(got.params["classifier"]["kernel"])) > 0
  ev = cli("eval", "--workdir", str(work))
  assert ev.returncode == 0, ev.stderr
  reported = json.loads(ev.stdout)
  total = sum(w.size for w in kernels.values())
  assert reported["prune_sparsity"] == pytest.approx(
      sum(round(0.6 * w.size) for w in kernels.values()) / total, abs=1e-4)
  assert 0 < reported["params_sparsity"] < reported["prune_sparsity"]


def test_bad_prune_config_is_one_line(digits_tiny_workdir, tmp_path):
  r = cli("finetune", "--config", "finetune_digits:tiny", "--init", str(digits_tiny_workdir),
          "--workdir", str(tmp_path / "w"), "--config.finetune.prune.sparsity=1.5")
  assert r.returncode == 2 and "finetune.prune.sparsity=1.5" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert not (tmp_path / "w").exists()
  r = cli("finetune", "--config", "finetune_digits:tiny", "--init", str(digits_tiny_workdir),
          "--workdir", str(tmp_path / "w"), "--config.finetune.prune.sparsity=0.5",
          "--config.finetune.prune.targets=nothing_matches")
  assert r.returncode == 2 and "matches no param" in r.stderr
  assert not (tmp_path / "w").exists()


def test_sparsity_of_a_quantized_checkpoint_counts_int8_zeros():
  """A pruned model quantized afterwards (mmjax quantize) keeps its zeros in int8."""
  qvalue = np.array([[0, 3], [0, -7]], np.int8)
  params = {"t": {"encoder": {"b": {"kernel": {"array": {
      "qvalue": qvalue, "scale": np.ones((1, 2), np.float32)}}, "bias": np.ones(2)}}}}
  got = measured_sparsity(params, TARGETS)
  assert got["prune_sparsity"] == 0.5 and got["params_sparsity"] == pytest.approx(2 / 6)
