"""Scan over layers and remat (model.scan_layers, model.remat) and the two param layouts.

A scanned stack must compute what the unrolled one computes from the same weights
(outputs and gradients), remat must not change gradients, dropout and stochastic depth
must stay random per layer under scan, and every reader of params (checkpoint restore
with the optimizer state, HF import/export, fine-tune plans) must take either layout.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import chex  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import mmjax  # noqa: E402
from mmjax.config import ConfigError  # noqa: E402
from mmjax.config_checks import CHOICES, validate  # noqa: E402
from mmjax.io import Checkpointer, hf, layers_layout  # noqa: E402
from mmjax.io.trees import flat  # noqa: E402
from mmjax.models.fusion import Fusion  # noqa: E402
from mmjax.models.layers import REMAT_POLICIES, DropPath  # noqa: E402
from mmjax.models.lora import merge_lora  # noqa: E402
from mmjax.models.text import TextEncoder  # noqa: E402
from mmjax.models.vit import ViT  # noqa: E402
from mmjax.train.state import TrainState  # noqa: E402
from mmjax.tuning.config import finetune_config  # noqa: E402
from mmjax.tuning.strategies import make_plan  # noqa: E402

SIZE = dict(width=16, depth=3, heads=2, mlp_dim=32)
IMAGES = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
IDS = jnp.array([[5, 6, 7, 8, 9, 0], [5, 9, 3, 0, 0, 0]])
MASK = (IDS > 0).astype(jnp.int32)


def tower(kind: str, **fields):
  """(module, apply(module, params, train=False, **kw) -> tokens) of a tiny tower."""
  common = {**SIZE, "dropout": 0.1, "drop_path": 0.2, **fields}
  if kind == "vit":
    return ViT(patch=4, image_size=8, **common), lambda m, p, **kw: m.apply(
        {"params": p}, IMAGES, **kw)["tokens"]
  if kind == "text":
    return TextEncoder(vocab_size=11, max_len=6, causal=True, **common), lambda m, p, **kw: (
        m.apply({"params": p}, IDS, MASK, **kw)["tokens"])
  return Fusion(mode="cross", **common), lambda m, p, **kw: m.apply(
      {"params": p}, jnp.ones((2, 6, 16)), MASK, IMAGES.reshape(2, 12, 16), **kw)


def grads(kind, params, **fields):
  module, run = tower(kind, **fields)
  w = jax.random.normal(jax.random.PRNGKey(9), (SIZE["width"],))
  loss = lambda p: jnp.sin(run(module, p) @ w).mean()
  return jax.jit(jax.grad(loss))(params)


def assert_close(a, b, rel=1e-5):
  """Every leaf of `a` within rel x (its largest magnitude, at least 1) of `b`'s."""
  a, b = flat(a), flat(b)
  assert sorted(a) == sorted(b)
  for k in a:
    bar = rel * max(1.0, float(jnp.abs(b[k]).max()))
    assert float(jnp.abs(a[k] - b[k]).max()) <= bar, k


@pytest.mark.parametrize("kind", ["vit", "text", "fusion"])
def test_scanned_equals_unrolled_and_remat_keeps_grads(kind):
  module, run = tower(kind)
  params = _init(kind)
  stacked = layers_layout.to_layout(params, True)
  scanned, _ = tower(kind, scan_layers=True)
  chex.assert_trees_all_equal_shapes(
      stacked, jax.eval_shape(lambda: _init(kind, scan_layers=True)))
  assert "blocks" in stacked["encoder"] and "block_0" in params["encoder"]
  assert stacked["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape == (3, 16, 32)
  forward = jax.jit(run, static_argnums=0)
  np.testing.assert_allclose(forward(scanned, stacked), forward(module, params), atol=1e-5)

  reference = grads(kind, params)
  assert_close(grads(kind, stacked, scan_layers=True),
               layers_layout.to_layout(reference, True))
  if kind != "fusion":    # the same Encoder code: two towers cover remat
    assert_close(grads(kind, params, remat="full"), reference)
    assert_close(grads(kind, stacked, scan_layers=True, remat="dots_with_no_batch_dims_saveable"),
                 layers_layout.to_layout(reference, True))


def _init(kind, **fields):
  module, _ = tower(kind, **fields)
  args = {"vit": (IMAGES,), "text": (IDS, MASK)}.get(
      kind, (jnp.ones((2, 6, 16)), MASK, IMAGES.reshape(2, 12, 16)))
  return jax.jit(module.init)(jax.random.PRNGKey(1), *args)["params"]


def _sow_outputs(next_fun, args, kwargs, context):
  """Records what every Dropout / DropPath returns, under "intermediates"."""
  out = next_fun(*args, **kwargs)
  if context.method_name == "__call__" and isinstance(context.module, (nn.Dropout, DropPath)):
    context.module.sow("intermediates", "out", out)
  return out


def test_dropout_and_drop_path_stay_per_layer_under_scan():
  module, _ = tower("vit", scan_layers=True, drop_path=1.0, dropout=0.5)
  params = _init("vit", scan_layers=True)
  with nn.intercept_methods(_sow_outputs):
    _, got = jax.jit(lambda p: module.apply({"params": p}, IMAGES, train=True,
                                            rngs={"dropout": jax.random.PRNGKey(2)},
                                            mutable=["intermediates"]))(params)
  blocks = flat(got["intermediates"]["encoder"]["blocks"])
  drop_path = blocks["DropPath_0/out"][0]                 # [depth, B, N, D]
  dropout = blocks["Dropout_0/out"][0]                    # [depth, B, N, D]
  chex.assert_shape([drop_path, dropout], (3, 2, 5, 16))
  # Stochastic depth 0, 0.5, 1.0 up the stack: the bottom branch always kept, the top
  # one always dropped.
  assert bool(jnp.all(drop_path[0] != 0)) and bool(jnp.all(drop_path[2] == 0))
  # Each layer draws its own dropout mask: the same rng in every layer would drop the
  # same units everywhere.
  dropped = np.asarray(dropout[:2] == 0)
  assert 0.3 < dropped.mean() < 0.7
  assert (dropped[0] != dropped[1]).mean() > 0.3


def test_decoding_with_a_kv_cache_through_a_scanned_stack():
  """Prefill + one token per call through the scanned causal tower == one unrolled call
  on the whole text; the cache keeps its per-block layout."""
  unrolled, run = tower("text", head="lm")
  scanned, _ = tower("text", head="lm", scan_layers=True)
  params = _init("text", head="lm")
  stacked = layers_layout.to_layout(params, True)
  whole = run(unrolled, params)
  step = jax.jit(lambda ids, mask, cache: scanned.apply({"params": stacked}, ids, mask,
                                                        cache=cache))
  out = step(IDS[:, :3], MASK[:, :3], scanned.empty_cache(2, 6))
  tokens = [out["tokens"]]
  for t in range(3, 6):
    out = step(IDS[:, t:t + 1], MASK[:, t:t + 1], out["cache"])
    tokens.append(out["tokens"])
  assert len(out["cache"].keys) == SIZE["depth"]
  chex.assert_shape(out["cache"].keys[0], (2, 6, 2, 8))
  real = np.asarray(MASK, bool)
  np.testing.assert_allclose(np.concatenate(tokens, 1)[real], np.asarray(whole)[real],
                             atol=1e-5)


def test_layout_conversion_round_trips_and_leaves_resnet_blocks_alone():
  params = {"image_tower": {"stage_0": {"block_0": {"kernel": np.ones((2, 2))},
                                        "block_1": {"kernel": np.ones((2, 2))}}},
            "text_tower": {"encoder": {f"block_{i}": {"mlp": {"kernel": np.full((2, 3), i)}}
                                       for i in range(3)} | {"ln_final": {"scale": np.ones(2)}}}}
  stacked = layers_layout.to_layout(params, True)
  assert sorted(flat(stacked)) == ["image_tower/stage_0/block_0/kernel",
                                   "image_tower/stage_0/block_1/kernel",
                                   "text_tower/encoder/blocks/mlp/kernel",
                                   "text_tower/encoder/ln_final/scale"]
  kernel = stacked["text_tower"]["encoder"]["blocks"]["mlp"]["kernel"]     # [3, 2, 3]
  np.testing.assert_array_equal(kernel[:, 0, 0], [0, 1, 2])
  assert layers_layout.is_scanned(stacked) and layers_layout.is_scanned(params) is False
  chex.assert_trees_all_equal(layers_layout.to_layout(stacked, False), params)
  assert layers_layout.encoder_depths(stacked) == {"text_tower/encoder": 3}
  # Abstract leaves keep their sharding, with an unsharded layer axis in front.
  mesh = jax.make_mesh((1,), ("fsdp",))
  sds = jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
  abstract = {"encoder": {"block_0": {"k": sds}, "block_1": {"k": sds}}}
  leaf = layers_layout.to_layout(abstract, True)["encoder"]["blocks"]["k"]
  assert leaf.shape == (2, 2, 3) and leaf.sharding.spec == P(None, None, "fsdp")
  assert layers_layout.to_layout({"encoder": {"blocks": {"k": leaf}}}, False)[
      "encoder"]["block_1"]["k"].sharding.spec == P(None, "fsdp")


def _train_state(params, tx, loss):
  """A TrainState one step in (momentum non-zero), and the jitted step function."""
  def step(state):
    g = jax.grad(loss)(state.params)
    updates, opt_state = tx.update(g, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0))
  return jax.jit(step)(state), jax.jit(step)


@pytest.mark.parametrize("save_scanned", [False, True])
def test_checkpoint_resumes_in_the_other_layout_with_its_optimizer_state(tmp_path,
                                                                         save_scanned):
  (unrolled, run), (scanned, _) = tower("vit"), tower("vit", scan_layers=True)
  module = scanned if save_scanned else unrolled
  other = unrolled if save_scanned else scanned
  # Momentum SGD: Adam would blow float32 noise in the zero gradient of the key bias (softmax
  # ignores it) up to full-size steps, which differ between the layouts.
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
  w = jax.random.normal(jax.random.PRNGKey(9), (SIZE["width"],))
  loss_of = lambda m: lambda p: jnp.sin(run(m, p) @ w).mean()
  params = layers_layout.to_layout(_init("vit"), save_scanned)
  saved, step = _train_state(params, tx, loss_of(module))
  ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
  ckpt.save(1, saved, {}, "{}")
  ckpt.wait()

  mesh = jax.make_mesh((1,), ("data",))
  fresh = layers_layout.to_layout(params, not save_scanned)
  template = TrainState(step=jnp.zeros((), jnp.int32), params=fresh, opt_state=tx.init(fresh),
                        rng=jax.random.PRNGKey(0))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
      template)
  got, _, at = ckpt.restore(abstract)
  ckpt.close()
  assert at == 1
  chex.assert_trees_all_equal_structs(got, template)
  converted = layers_layout.to_layout(saved, not save_scanned)
  chex.assert_trees_all_equal(got.params, converted.params)
  chex.assert_trees_all_equal(got.opt_state, converted.opt_state)
  # Training goes on as it would have in the saved layout.
  _, step_other = _train_state(fresh, tx, loss_of(other))
  assert_close(step_other(got).params, layers_layout.to_layout(step(saved).params,
                                                               not save_scanned))


def test_hf_import_and_export_take_either_layout(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  transformers.ViTModel(transformers.ViTConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=16, patch_size=4)).save_pretrained(tmp_path / "hf")
  unrolled = hf.from_pretrained(tmp_path / "hf")
  config = ml_collections.ConfigDict(unrolled.config.to_dict())
  config.model.scan_layers = True
  stacked, _ = hf.load_variables(tmp_path / "hf", config)
  assert "blocks" in stacked["image_tower"]["encoder"]
  chex.assert_trees_all_equal(stacked, layers_layout.to_layout(unrolled.params, True))
  out = hf.save_pretrained(tmp_path / "export", config, stacked, hf_config_base=unrolled.hf_config)
  original, exported = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "hf", out))
  assert sorted(exported) == sorted(original)
  for k in original:
    np.testing.assert_array_equal(exported[k], original[k], err_msg=k)


def test_finetune_plans_under_scan_lora_works_per_block_strategies_are_refused():
  config = mmjax.load_config("demo:tiny", ["--config.model.scan_layers=True"])
  with config.unlocked():
    config.finetune = finetune_config(strategy="lora", lora_rank=2)
  model = mmjax.build_model(config, 64)
  batch = {"image": np.zeros((1, 32, 32, 3), np.float32), "text": np.zeros((1, 16), np.int32),
           "text_mask": np.ones((1, 16), np.int32)}
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))["params"]
  names = flat(params)
  assert "text_tower/encoder/blocks/attn/query/lora_a" in names
  plan = flat(make_plan(config.finetune, params).lr_scale)
  assert plan["text_tower/encoder/blocks/attn/query/lora_a"] == 1.0
  assert plan["text_tower/encoder/blocks/attn/query/kernel"] == 0.0
  for change, key in ((dict(strategy="progressive"), "strategy"),
                      (dict(freeze_bottom=1), "freeze_bottom"),
                      (dict(layer_decay=0.8), "layer_decay")):
    with pytest.raises(ValueError, match=rf"^finetune\.{key}=.*model\.scan_layers=False"):
      make_plan(finetune_config(**change), params)


def test_remat_config_is_checked_and_names_every_policy():
  assert CHOICES["model.remat"] == ("none", *REMAT_POLICIES)
  with pytest.raises(ConfigError, match=r"model\.remat='dots'"):
    validate(mmjax.load_config("demo:tiny", ["--config.model.remat=dots"]))
  with pytest.raises(ConfigError, match=r"model\.scan_layers=1: expected True or False"):
    mmjax.load_config("demo:tiny", ["--config.model.scan_layers=1"])


def test_lora_merges_into_a_scanned_stack_as_into_unrolled_blocks():
  r = np.random.default_rng(0)
  dense = lambda: {"kernel": r.normal(size=(4, 6)).astype(np.float32),
                   "lora_a": r.normal(size=(4, 2)).astype(np.float32),
                   "lora_b": r.normal(size=(2, 6)).astype(np.float32)}
  params = {"encoder": {f"block_{i}": {"attn": {"query": dense()}} for i in range(3)}}
  merged = merge_lora(layers_layout.to_layout(params, True), alpha=4.0)
  chex.assert_trees_all_close(merged, layers_layout.to_layout(merge_lora(params, 4.0), True),
                              atol=1e-6)
  assert "lora_a" not in merged["encoder"]["blocks"]["attn"]["query"]
