"""Fine-tuning strategies: what each freezes stays bit-identical, what it trains moves,
frozen params hold no optimizer state, progressive unfreezing compiles once, LoRA."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import objectives
from mmjax.tuning import finetune_config, make_plan, merge_lora
from mmjax.models import build_model
from mmjax.parallel import path_name
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import TrainState
from mmjax.train.steps import make_train_step

B, S, L, V, C = 4, 16, 8, 40, 5


def config(classify="fusion", image_only=False, **finetune):
  t = lambda **kw: dict(dict(variant="mu", depth=1), **kw)
  model = dict(image=t(patch=4, pool="cls", depth=2),
               classifier=dict(input=classify, num_classes=C))
  if not image_only:
    model.update(text=t(pool="cls", vocab_size=V), fusion=t(mode="cross"))
  return ml_collections.ConfigDict(dict(
      data=dict(image_size=S, max_len=L), model=model, objectives=dict(classify=1.0),
      optim=dict(name="adamw", lr=1e-2, weight_decay=0.1, schedule="constant"),
      total_steps=10, finetune=finetune_config(**finetune)))


def batch(seed=0):
  r = np.random.default_rng(seed)
  return {"image": jnp.asarray(r.normal(size=(B, S, S, 3)), jnp.float32),
          "text": jnp.asarray(r.integers(5, V, (B, L)), jnp.int32),
          "text_mask": jnp.ones((B, L), jnp.int32),
          "label": jnp.asarray(r.integers(0, C, (B,)), jnp.int32)}


def init(c, seed=0):
  model = build_model(c)
  params = model.init({"params": jax.random.key(seed)}, batch())["params"]
  return model, params


def run_steps(c, n=2):
  """(initial params, params after n steps of the real train step, plan, step fn)."""
  model, params = init(c)
  plan = make_plan(c.finetune, params)
  tx, schedule = make_optimizer(c.optim, params, c.total_steps, plan.lr_scale)
  step = jax.jit(make_train_step(model, tx, objectives.combined({"classify": 1.0}), schedule,
                                 plan.trainable, plan.unfreeze_step))
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key_data(
      jax.random.key(1)))
  history = [params]
  for i in range(n):
    state, _ = step(state, batch(i))
    history.append(state.params)
  return history, plan


def flat(tree):
  return {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# strategy options -> regex of the params that must train (all others must stay frozen).
# The cases that are about towers classify through the fusion tower (image + text +
# fusion all in the graph); the others use an image classifier, which compiles faster.
TOWER_CASES = ("full", "lit", "per_modality")
CASES = {
    "full": (dict(strategy="full"), r"."),
    "lit": (dict(strategy="partial", freeze_towers=("image",)), r"^(?!image_tower/)"),
    "bottom_1": (dict(strategy="partial", freeze_bottom=1),
                 r"^classifier/|^image_tower/encoder/(block_1|ln_final)/"),
    "regex": (dict(strategy="partial", freeze_regex=r"/ln\w*/"), r"^(?!.*/ln\w*/)"),
    "per_modality": (dict(strategy="per_modality", modality="text", modality_lr_scale=0.5),
                     r"^(text_tower|classifier)/"),
    "linear_probe": (dict(strategy="linear_probe"), r"^classifier/"),
    "lora": (dict(strategy="lora", lora_rank=2, lora_targets=("query", "value", "fc1")),
             r"^classifier/|/lora_[ab]$"),
    "adapters": (dict(strategy="adapters", adapter_dim=4), r"^classifier/|/adapter_(attn|mlp)/"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_strategy_freezes_and_trains_what_it_says(case):
  import re
  options, trains = CASES[case]
  fusion = case in TOWER_CASES
  history, plan = run_steps(config("fusion" if fusion else "image", not fusion, **options))
  before, after = flat(history[0]), flat(history[-1])
  should = {k for k in before if re.search(trains, k)}
  assert should and should != set(before) or case == "full"
  assert {k for k, t in flat(plan.trainable).items() if t} == should
  for k in before:
    if k in should:
      assert not np.array_equal(before[k], after[k]), f"{case}: {k} did not train"
    else:
      np.testing.assert_array_equal(before[k], after[k], err_msg=f"{case}: {k} moved")


def _opt_elements(opt_state):
  return sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)


def test_frozen_params_hold_no_optimizer_state():
  c = config(strategy="partial", freeze_towers=("image", "text"))
  _, params = init(c)
  plan = make_plan(c.finetune, params)
  n_train, n_all = plan.count(params)
  assert 0 < n_train < n_all / 2
  shapes = lambda tx: jax.eval_shape(tx.init, params)
  frozen_tx, _ = make_optimizer(c.optim, params, 10, plan.lr_scale)
  full_tx, _ = make_optimizer(c.optim, params, 10)
  # AdamW keeps mu and nu: two floats per trainable param, none per frozen one.
  assert _opt_elements(shapes(frozen_tx)) == 2 * n_train
  assert _opt_elements(shapes(full_tx)) == 2 * n_all
  frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes(frozen_tx)))
  assert frozen_bytes < 4 * 2 * n_train + 64     # + a few step counters


def test_layer_decay_and_lr_groups_scale_each_params_update():
  c = config(image_only=True, classify="image", strategy="full", layer_decay=0.5,
             lr_groups=((r"^classifier/", 3.0),))
  with c.unlocked():
    c.optim = ml_collections.ConfigDict(dict(name="sgd", lr=0.1, momentum=0.0,
                                             weight_decay=0.0, schedule="constant"))
  _, params = init(c)
  plan = make_plan(c.finetune, params)
  scale = flat(plan.lr_scale)
  # depth 2: above the blocks x1, block_1 x0.5, block_0 x0.25, embeddings x0.125.
  expected = {"image_tower/encoder/ln_final/scale": 1.0,
              "image_tower/encoder/block_1/mlp/fc1/kernel": 0.5,
              "image_tower/encoder/block_0/attn/query/kernel": 0.25,
              "image_tower/patch_embed/kernel": 0.125, "image_tower/posemb": 0.125,
              "classifier/kernel": 3.0}
  assert {k: scale[k] for k in expected} == expected
  tx, _ = make_optimizer(c.optim, params, 10, plan.lr_scale)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for k, u in flat(updates).items():
    np.testing.assert_allclose(u, -0.1 * scale[k], rtol=1e-6, err_msg=k)


def test_progressive_unfreezing_compiles_once_and_unfreezes_on_schedule():
  c = config(image_only=True, classify="image", strategy="progressive", unfreeze_every=2,
             unfreeze_depth=2)
  traces = []
  model, params = init(c)
  plan = make_plan(c.finetune, params)
  tx, schedule = make_optimizer(c.optim, params, 10, plan.lr_scale)
  inner = make_train_step(model, tx, objectives.combined({"classify": 1.0}), schedule,
                          plan.trainable, plan.unfreeze_step)

  def counted(state, b):
    traces.append(1)
    return inner(state, b)

  step = jax.jit(counted)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                     jax.random.key_data(jax.random.key(1)))
  history = [flat(params)]
  for i in range(6):
    state, _ = step(state, batch(i))
    history.append(flat(state.params))
  assert len(traces) == 1
  # First step (1-based) at which each group moves: head at once, top block (and the
  # norm above it) at state.step 2 -> step 3, block_0 at step 5, embeddings never
  # (unfreeze_depth=2 of 2 blocks).
  first = {r"^classifier/": 1, r"/(block_1|ln_final)/": 3, r"/block_0/": 5,
           r"^image_tower/(patch_embed|posemb|cls)": None}
  import re
  for rx, start in first.items():
    names = [k for k in history[0] if re.search(rx, k)]
    assert names, rx
    for k in names:
      moved = [i for i in range(1, 7) if not np.array_equal(history[i][k], history[i - 1][k])]
      if start is None:
        assert not moved, k
      else:
        assert moved and moved[0] == start, (k, moved)


def _outputs(model, params, b):
  return model.apply({"params": params}, b, method=model.classify)


def test_lora_and_adapters_start_equal_to_the_base_model():
  b = batch()
  base_model, base = init(config())
  for options in (dict(lora_rank=2, lora_targets=("query", "key", "value", "out", "fc1", "fc2")),
                  dict(adapter_dim=4)):
    model, params = init(config(**options))
    p = flat(params)
    # The base weights are the same draws: the extra params do not shift the init.
    for k, v in flat(base).items():
      np.testing.assert_array_equal(p[k], v)
    np.testing.assert_allclose(_outputs(model, params, b), _outputs(base_model, base, b),
                               atol=1e-6)


def test_lora_merge_gives_the_same_outputs():
  alpha = 8.0
  model, params = init(config(lora_rank=4, lora_alpha=alpha,
                              lora_targets=("query", "value", "out", "fc2")))
  # Non-zero B, as after training.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: (x + 0.05 * jax.random.normal(jax.random.key(len(path_name(p))), x.shape)
                    if path_name(p).endswith("lora_b") else x), params)
  merged = merge_lora(params, alpha)
  assert not any(k.endswith(("lora_a", "lora_b")) for k in flat(merged))
  base_model, base = init(config())
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  b = batch()
  unmerged_out = _outputs(model, params, b)
  assert not np.allclose(unmerged_out, _outputs(base_model, base, b), atol=1e-3)
  np.testing.assert_allclose(_outputs(base_model, merged, b), unmerged_out, atol=2e-5)


def test_lora_trains_under_two_percent_of_a_b16_model():
  t = lambda **kw: ml_collections.ConfigDict(dict(dict(variant="B/16"), **kw))
  c = ml_collections.ConfigDict(dict(
      data=dict(image_size=224, max_len=64),
      model=dict(image=t(), text=t(variant="B", vocab_size=32000), embed_dim=512,
                 classifier=dict(input="image", num_classes=1000)),
      objectives=dict(classify=1.0),
      finetune=finetune_config(strategy="lora", lora_rank=8,
                               lora_targets=("query", "key", "value", "out"))))
  model = build_model(c)
  b = {"image": jnp.zeros((1, 224, 224, 3)), "text": jnp.zeros((1, 64), jnp.int32),
       "text_mask": jnp.ones((1, 64), jnp.int32)}
  params = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, b)["params"])
  n_train, n_all = make_plan(c.finetune, params).count(params)
  assert n_all > 150e6          # ViT-B/16 + a B text tower: the B-size model itself
  assert n_train / n_all <= 0.02, (n_train, n_all)
  lora = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if "lora" in path_name(p))
  assert lora == 24 * 4 * 2 * 8 * 768      # 24 blocks x q,k,v,o x (A + B) x rank x width


def test_bad_strategy_options_fail_with_the_key():
  _, params = init(config())
  for options, words in ((dict(strategy="nope"), "unknown"),
                         (dict(strategy="lora"), "lora_rank"),
                         (dict(strategy="partial", freeze_towers=("vision",)), "freeze_towers"),
                         (dict(strategy="per_modality", modality="audio"), "modality")):
    with pytest.raises(ValueError, match=words):
      make_plan(finetune_config(**options), params)
