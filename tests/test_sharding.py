"""Sharding tactics (mmjax/parallel.py): the exact spec each param gets under regex rules,
the fsdp tactic and the Megatron layout of a `model` axis; bad meshes and unshardable
params; tensor parallelism trains as data parallelism does."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import mmjax
from mmjax import chunked_losses, parallel
from mmjax.config import ConfigError
from mmjax.config_checks import validate
from mmjax.io.trees import flat, unflat
from mmjax.models import dense
from conftest import cli, run_python

AXES = parallel.AXES


def mesh(data=1, fsdp=1, model=1):
  return AbstractMesh((data, fsdp, model), AXES)


def f32(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


# A transformer block's params as mmjax names them (width 64, MLP 256), a ResNet conv and
# BatchNorm, a scanned stack of 4 blocks (leading layer axis), embeddings and scalars.
TREE = unflat({
    "enc/block_0/attn/query/kernel": f32(64, 64),
    "enc/block_0/attn/query/bias": f32(64),
    "enc/block_0/attn/out/kernel": f32(64, 64),
    "enc/block_0/attn/out/bias": f32(64),
    "enc/block_0/cross_attn/value/kernel": f32(64, 64),
    "enc/block_0/mlp/fc1/kernel": f32(64, 256),
    "enc/block_0/mlp/fc1/bias": f32(256),
    "enc/block_0/mlp/fc2/kernel": f32(256, 64),
    "enc/block_0/ln1/scale": f32(64),
    "enc/blocks/mlp/fc1/kernel": f32(4, 64, 256),
    "enc/blocks/attn/out/kernel": f32(4, 64, 64),
    "resnet/stage_0/block_0/conv1/kernel": f32(3, 3, 64, 128),
    "resnet/stage_0/block_0/bn1/scale": f32(128),
    "token_embed/embedding": f32(1000, 64),
    "posemb": f32(1, 50, 64),
    "logit_scale": f32(),
    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
})


def specs(m, rules=(), **kw):
  return flat(parallel.param_specs(TREE, rules, m, **kw))


def test_rules_tactic_replicates_what_no_rule_names():
  got = specs(mesh(data=4, fsdp=2), rules=[(r"mlp/fc1/kernel$", (None, "fsdp"))])
  assert got["enc/block_0/mlp/fc1/kernel"] == P(None, "fsdp")
  assert got["enc/block_0/mlp/fc2/kernel"] == P()
  assert got["resnet/stage_0/block_0/conv1/kernel"] == P()
  assert set(got.values()) == {P(), P(None, "fsdp")}


def test_fsdp_tactic_shards_the_largest_divisible_dim_of_large_params():
  # min 0.05 MB: 64x64 f32 (16 KB) and smaller stay replicated.
  got = specs(mesh(data=2, fsdp=4), tactic="fsdp", min_size_mb=0.05)
  assert got["enc/block_0/mlp/fc1/kernel"] == P(None, "fsdp")          # 64 KB: 256
  assert got["enc/block_0/mlp/fc2/kernel"] == P("fsdp")
  assert got["enc/blocks/mlp/fc1/kernel"] == P(None, None, "fsdp")
  assert got["enc/blocks/attn/out/kernel"] == P(None, "fsdp")          # 64 KB: 64 of 4,64,64
  assert got["resnet/stage_0/block_0/conv1/kernel"] == P(None, None, None, "fsdp")   # Cout
  assert got["token_embed/embedding"] == P("fsdp")                     # 1000 % 4 == 0
  for name in ("enc/block_0/attn/query/kernel", "enc/block_0/mlp/fc1/bias", "posemb",
               "logit_scale", "resnet/stage_0/block_0/bn1/scale"):
    assert got[name] == P(), name
  # Every param at min 0: the first of equal largest dims; scalars and integer leaves
  # (an RNG key) stay replicated.
  got = specs(mesh(fsdp=2), tactic="fsdp", min_size_mb=0)
  assert got["enc/block_0/attn/query/kernel"] == P("fsdp")
  assert got["posemb"] == P(None, None, "fsdp")
  assert got["logit_scale"] == got["rng"] == P()


def test_model_axis_gives_the_megatron_layout():
  got = specs(mesh(data=2, model=4))
  want = {
      "enc/block_0/attn/query/kernel": P(None, "model"),   # heads = output columns
      "enc/block_0/attn/query/bias": P("model"),
      "enc/block_0/cross_attn/value/kernel": P(None, "model"),
      "enc/block_0/attn/out/kernel": P("model"),           # heads = input rows
      "enc/block_0/attn/out/bias": P(),
      "enc/block_0/mlp/fc1/kernel": P(None, "model"),
      "enc/block_0/mlp/fc1/bias": P("model"),
      "enc/block_0/mlp/fc2/kernel": P("model"),
      "enc/blocks/mlp/fc1/kernel": P(None, None, "model"),  # scanned: from the end
      "enc/blocks/attn/out/kernel": P(None, "model"),
      "resnet/stage_0/block_0/conv1/kernel": P(),         # convs are not attention/MLP
  }
  for name, spec in want.items():
    assert got[name] == spec, (name, got[name])
  assert all(got[n] == P() for n in got if n not in want)
  # With fsdp too: the model dim is taken, fsdp splits the largest other one.
  got = specs(mesh(fsdp=2, model=2), tactic="fsdp", min_size_mb=0)
  assert got["enc/block_0/mlp/fc1/kernel"] == P("fsdp", "model")
  assert got["enc/block_0/mlp/fc2/kernel"] == P("model", "fsdp")
  assert got["enc/block_0/mlp/fc1/bias"] == P("model")
  # A size-1 model axis is no tensor parallelism: the spec never names it.
  assert specs(mesh(data=8))["enc/block_0/mlp/fc1/kernel"] == P()


def test_a_rule_wins_over_tactic_and_layout():
  got = specs(mesh(fsdp=2, model=2), rules=[(r"fc1/kernel$", ())], tactic="fsdp",
              min_size_mb=0)
  assert got["enc/block_0/mlp/fc1/kernel"] == P()
  assert got["enc/block_0/mlp/fc2/kernel"] == P("model", "fsdp")


def test_params_that_cannot_be_sharded_are_one_line_errors():
  with pytest.raises(ValueError) as e:      # a `kernel$` rule meets a 3x3 conv
    specs(mesh(fsdp=2), rules=[(r"kernel$", ("fsdp",))])
  assert str(e.value) == ("sharding rule 'kernel$': resnet/stage_0/block_0/conv1/kernel "
                          "(3, 3, 64, 128): dim 0 (size 3) not divisible by mesh axis "
                          "'fsdp' of size 2")
  with pytest.raises(ValueError, match=r"^tensor parallelism: enc/block_0/attn/out/kernel "
                                       r"\(64, 64\): dim 0 \(size 64\) not divisible by "
                                       r"mesh axis 'model' of size 3$"):
    specs(mesh(model=3))
  with pytest.raises(ValueError) as e:
    specs(mesh(fsdp=3), tactic="fsdp", min_size_mb=0.01)
  assert "sharding tactic 'fsdp': enc/block_0/attn/out/kernel (64, 64) (0.02 MB > " \
         "sharding.min_size_mb=0.01) has no free dimension divisible by mesh axis 'fsdp' " \
         "of size 3" in str(e.value)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="sharding.tactic='zero3'"):
    specs(mesh(), tactic="zero3")


def test_meshes_that_do_not_fit_the_devices_are_errors():
  devices = jax.devices()[:1] * 8        # only the count matters before the mesh is built
  with pytest.raises(ValueError, match=r"the fixed axes \(3 devices\) do not divide the 8"):
    parallel.make_mesh({"data": -1, "fsdp": 3}, devices)
  with pytest.raises(ValueError, match=r"needs 4 devices; 8 are present"):
    parallel.make_mesh({"data": 2, "fsdp": 1, "model": 2}, devices)
  with pytest.raises(ValueError, match=r"mesh axes \['tensor'\] unknown"):
    parallel.make_mesh({"data": -1, "tensor": 2}, devices)
  config = mmjax.load_config("demo:tiny", ["--config.mesh.model=3"])
  with pytest.raises(ConfigError, match="does not fit the 8 devices"):
    validate(config, device_count=8)
  with pytest.raises(ConfigError, match=r"sharding.tactic='fsdpp': expected one of"):
    validate(mmjax.load_config("demo:tiny", ["--config.sharding.tactic=fsdpp"]))


def test_cli_mesh_that_does_not_fit_is_one_line_and_writes_nothing(tmp_path):
  r = cli("train", "--config", "demo:tiny", "--workdir", str(tmp_path / "wd"),
          "--config.mesh.model=3")
  assert r.returncode == 2
  assert r.stderr.strip() == ("mmjax train: error: mesh {'data': -1, 'fsdp': 1, 'model': 3} "
                              f"does not fit the {jax.device_count()} devices present")
  assert not (tmp_path / "wd").exists()


def test_batch_axes_agree_across_layers():
  """models/dense.py and chunked_losses.py name the batch axes without importing
  parallel (they sit below it); they must name the same ones."""
  assert parallel.BATCH_SPEC == P(parallel.BATCH_AXES)
  assert dense.BATCH_AXES == chunked_losses.BATCH_AXES == parallel.BATCH_AXES
  assert dense.MODEL_AXIS in parallel.AXES


def test_activation_constraints_only_under_a_model_axis():
  """The model code stays device-agnostic: `constrain` is the identity unless the mesh
  being traced under splits `model`."""
  x = jnp.ones((8, 4))
  assert not dense.tensor_parallel() and dense.constrain(x, -1) is x
  with jax.sharding.use_abstract_mesh(mesh(data=8)):
    assert not dense.tensor_parallel() and dense.constrain(x, -1) is x
  with jax.sharding.use_abstract_mesh(mesh(data=4, model=2)):
    assert dense.tensor_parallel()


@pytest.mark.slow
def test_tensor_and_fsdp_parallel_equal_data_parallel():
  """A CLIP (configs/bench.py's layout: ViT + causal text tower, 4 heads, width 64) on
  8 devices as (data 2, fsdp 2, model 2) with every param sharded, against (data 8):
  the same losses and params after 3 steps (dropout on); and so with the contrastive
  loss chunked over the 4 batch devices (objective_options.contrastive.chunked)."""
  code = r"""
import jax, numpy as np, mmjax
from jax.sharding import PartitionSpec as P
from mmjax import data, parallel
from mmjax.train.loop import make_step, setup
size = [f"--config.model.{t}.{k}={v}" for t in ("image", "text")
        for k, v in (("width", 64), ("heads", 4), ("depth", 1), ("mlp_dim", 128))]
# tower_splits=1: the bench's split of the batch into half-batches is a 2-core CPU trick.
base = ["--config.batch_size=16", "--config.model.dropout=0.1", "--config.model.tower_splits=1",
        "--config.model.text.vocab_size=512"] + size
tp = base + ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.model=2",
             "--config.sharding.tactic=fsdp", "--config.sharding.min_size_mb=0"]
chunked = tp + ["--config.objective_options={'contrastive': {'chunked': True}}"]
got = {}
for name, overrides in (("data", base), ("tp", tp), ("chunked", chunked)):
  c = mmjax.load_config("configs/bench.py", overrides)
  run = setup(c)
  block = run.state.params["image_tower"]["encoder"]["block_0"]
  if name != "data":
    assert block["mlp"]["fc1"]["kernel"].sharding.spec == P("fsdp", "model")
    assert block["attn"]["out"]["kernel"].sharding.spec == P("model", "fsdp")
  it = data.make_iterator(c.data, "train", batch_size=c.batch_size, train=True,
                          tokenizer=run.tokenizer)
  step, s, losses = make_step(run), run.state, []
  for _ in range(3):
    s, m = step(s, parallel.device_batch(next(it), run.mesh))
    losses.append(float(m["loss"]))
  got[name] = (losses, jax.device_get(s.params))
for name in ("tp", "chunked"):
  np.testing.assert_allclose(got["data"][0], got[name][0], rtol=1e-5)
  diff = max(float(np.max(np.abs(x - y))) for x, y in
             zip(jax.tree.leaves(got["data"][1]), jax.tree.leaves(got[name][1])))
  assert diff < 1e-5, (name, diff)
  print(name, "max param diff", diff)
"""
  r = run_python(code, devices=8)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("max param diff") == 2, r.stdout


def test_cli_tactic_that_cannot_shard_a_param_is_one_line_and_writes_nothing(tmp_path):
  # 3 devices: no dimension of the tiny model's token embedding (169, 32) divides by 3.
  workdir = tmp_path / "wd"
  code = f"""
import sys
from mmjax import cli
sys.exit(cli.main(["train", "--config", "demo:tiny", "--workdir", {str(workdir)!r},
                   "--no-progress", "--config.batch_size=12", "--config.eval_batch_size=12",
                   "--config.mesh.data=1", "--config.mesh.fsdp=3",
                   "--config.sharding.tactic=fsdp", "--config.sharding.min_size_mb=0.01"]))
"""
  r = run_python(code, devices=3)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
      "mmjax train: error: sharding tactic 'fsdp': params/text_tower/token_embed/embedding "
      "(169, 32) (0.02 MB > sharding.min_size_mb=0.01) has no free dimension divisible by "
      "mesh axis 'fsdp' of size 3; add a sharding rule for it or raise sharding.min_size_mb")
  assert not workdir.exists()
