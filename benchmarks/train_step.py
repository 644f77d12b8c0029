"""Train-step throughput: mmjax on configs/bench.py vs transformers' PyTorch CLIPModel.

  make bench                                   # installs torch==2.13.0 + transformers first
  .venv/bin/python benchmarks/train_step.py [--rounds 4 --steps 5 --warmup 3]
      [--only jax|torch] [--config.model.dtype=bfloat16 ...]

Both sides train the same CLIP (see configs/bench.py) on the same synthetic
batch (64 images 32x32x3, 32-token right-padded captions with EOS last); data
loading is excluded. The mmjax step is the library's own: `loop.setup(config)`
and `loop.make_step(run)` (`make_train_step` jitted with the state donated),
exactly what the train loop runs.
PyTorch: HF `CLIPModel(CLIPConfig(...))`, random init, 2 threads, AdamW,
`return_loss=True`. Steps are timed one by one, in alternating rounds of
`--steps` per side so that load from other processes hits both alike; the
medians are reported. Prints ONE JSON line.

Process environment: malloc huge pages (GLIBC_TUNABLES) must be set before the
process starts, so the script re-executes itself with them unless
--no-hugetlb. No XLA flag helped (BENCHMARKS.md); XLA_FLAGS is passed through.
"""
from __future__ import annotations

import os
import sys

HUGETLB = "glibc.malloc.hugetlb=1"


def _ensure_env() -> None:
  if "--no-hugetlb" in sys.argv or HUGETLB in os.environ.get("GLIBC_TUNABLES", ""):
    return
  tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES", ""), HUGETLB) if t)
  os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, GLIBC_TUNABLES=tunables))


_ensure_env()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmjax import parallel  # noqa: E402
from mmjax.config import load_config  # noqa: E402
from mmjax.train.loop import make_step, setup  # noqa: E402

EOS = 8191  # last id of the 8192-token vocabulary; HF pools the first EOS, mmjax the last real token


def synthetic_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """Images [B, S, S, 3]; ids [B, L] with EOS at the last real token, 0-padded; mask [B, L]."""
  b, s, length = config.batch_size, config.data.image_size, config.data.max_len
  rng = np.random.default_rng(seed)
  image = rng.standard_normal((b, s, s, 3), dtype=np.float32)
  lengths = rng.integers(length // 4, length + 1, size=b)
  ids = rng.integers(5, EOS, size=(b, length), dtype=np.int32)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask == 1, ids, 0).astype(np.int32)
  ids[np.arange(b), lengths - 1] = EOS
  return {"image": image, "text": ids, "text_mask": mask}


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class JaxSide:
  def __init__(self, config, batch):
    run = setup(config)
    self.step_fn = make_step(run)   # make_train_step, jitted with shardings, state donated
    self.state = run.state
    self.batch = parallel.device_batch(batch, run.mesh)
    self.params = count(run.state.params)

  def step(self) -> float:
    t = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t


class TorchSide:
  def __init__(self, config, batch, threads: int):
    import torch
    import transformers
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    img, txt = config.model.image, config.model.text
    common = dict(hidden_act=img.act, layer_norm_eps=1e-5, attention_dropout=0.0)
    cfg = transformers.CLIPConfig(
        projection_dim=config.model.embed_dim,
        vision_config=dict(hidden_size=img.width, intermediate_size=img.mlp_dim,
                           num_hidden_layers=img.depth, num_attention_heads=img.heads,
                           image_size=config.data.image_size, patch_size=img.patch, **common),
        text_config=dict(hidden_size=txt.width, intermediate_size=txt.mlp_dim,
                         num_hidden_layers=txt.depth, num_attention_heads=txt.heads,
                         vocab_size=txt.vocab_size, max_position_embeddings=config.data.max_len,
                         pad_token_id=0, bos_token_id=EOS - 1, eos_token_id=EOS, **common))
    self.torch = torch
    self.model = transformers.CLIPModel(cfg).train()
    self.attn = self.model.config._attn_implementation
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.optim.lr,
                                 weight_decay=config.optim.weight_decay)
    self.inputs = dict(pixel_values=torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()),
                       input_ids=torch.from_numpy(batch["text"]).long(),
                       attention_mask=torch.from_numpy(batch["text_mask"]).long())
    self.params = sum(p.numel() for p in self.model.parameters())
    self.version = torch.__version__, transformers.__version__

  def step(self) -> float:
    t = time.perf_counter()
    loss = self.model(**self.inputs, return_loss=True).loss
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=str(ROOT / "configs/bench.py"))
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--only", choices=("jax", "torch"), default=None)
  p.add_argument("--no-hugetlb", action="store_true", help="do not re-exec with malloc huge pages")
  args, overrides = p.parse_known_args()   # + --config.key=value overrides

  config = load_config(args.config, overrides)
  batch = synthetic_batch(config)
  sides = {}
  if args.only != "torch":
    sides["mmjax"] = JaxSide(config, batch)
  if args.only != "jax":
    sides["torch"] = TorchSide(config, batch, args.threads)
  t_compile = {}
  for name, side in sides.items():
    t = time.perf_counter()
    for _ in range(args.warmup):
      side.step()
    t_compile[name] = time.perf_counter() - t
  times = {name: [] for name in sides}
  for _ in range(args.rounds):
    for name, side in sides.items():
      times[name] += [side.step() for _ in range(args.steps)]

  b = config.batch_size
  out = {"bench": "train_step", "config": "configs/bench.py", "batch": b}
  for name, side in sides.items():
    ms = statistics.median(times[name]) * 1e3
    out[f"{name}_ms"] = round(ms, 1)
    out[f"{name}_img_s"] = round(b / ms * 1e3, 1)
    out[f"{name}_ms_min"] = round(min(times[name]) * 1e3, 1)
    out[f"{name}_params"] = side.params
    out[f"{name}_steps"] = len(times[name])
  if len(sides) == 2:
    out["speedup"] = round(out["torch_ms"] / out["mmjax_ms"], 3)
    out["torch_attn"] = sides["torch"].attn
  out["jax"] = jax.__version__
  if "torch" in sides:
    out["torch"], out["transformers"] = sides["torch"].version
  out["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  out["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
  out["load1"] = round(os.getloadavg()[0], 2)
  out["cpu"] = platform.processor() or platform.machine()
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
