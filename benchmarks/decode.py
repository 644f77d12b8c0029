"""Decoding throughput: mmjax's KV-cache decoder vs recomputing the whole prefix every step,
and vs Hugging Face PyTorch GPT-2 `generate`, all greedy.

  .venv/bin/python benchmarks/decode.py [--models gpt2,caption] [--batch 1,16]
      [--new 32,64,128] [--recompute-steps 2] [--repeats 2] [--prompt 8[,128,...]]
      [--only mmjax|torch] [--dtype float32|bfloat16] [--prefill]

`--dtype bfloat16` sets the models' compute dtype (config model.dtype; params stay float32)
for mmjax's two implementations. On XLA:CPU it gains nothing: bfloat16 dots run in float32
and the decode loop still reads the float32 kernels (BENCHMARKS.md, "decode, batch 1
(second look)").

Models (random weights): "gpt2" is GPT-2 small's shape (12 layers, 768 wide, 12 heads,
vocabulary 50257, float32) through mmjax's GPT-2 import config; "caption" is
configs/caption_shapes.py's captioner (its decoder cross-attends to the image tokens; its
position table lengthened to hold 128 new tokens).
The prompts are `--prompt` random tokens per row (a captioner's: [CLS] alone), the same
for every implementation; EOS is a token that never comes, so every row makes exactly N
new tokens.

  mmjax_kv         `mmjax.generate.decode` (prefill, then one model step per further token
                   in a while_loop: N - 1 steps for N tokens)
  mmjax_recompute  a jitted baseline written here: each step runs the model over the whole
                   static buffer of P + N tokens (no cache) and writes the argmax after the
                   last real one. Its steps all cost the same, so it is timed over the first
                   `--recompute-steps` steps of the N (a full run at batch 16 and 128 tokens
                   would take most of an hour on 2 cores).
  torch_hf         `GPT2LMHeadModel.generate(do_sample=False, min_new_tokens=N)`, KV cache on,
                   torch CPU threads = 2 (gpt2 only)

`--prefill` times the prompt's one call alone (gpt2; per prompt length, no new tokens):

  mmjax_prefill            `mmjax.generate.decode.prefill`: the LM head on each prompt's
                           last real token only, logits [B, V]
  mmjax_prefill_all_logits the same call with the head on every prompt position, [B, P, V],
                           then the last real one taken (what prefill did until 2026-12-01)

mmjax's programs are compiled ahead of time (compilation excluded); the KV decoder runs
once untimed, then the best of `--repeats` calls counts; the recompute baseline's best of
`--repeats` calls counts (no untimed run: at batch 16 one of its steps is a forward of
2,176 tokens). torch: a 2-token warm-up, then the best of `--repeats` calls.
Prints a JSON line per (model, impl, batch, N): wall and CPU seconds, new tokens per wall
and per CPU second; then one per (model, batch, N) with the ratios kv/recompute and
kv/torch of both.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmjax.config import load_config  # noqa: E402
# decode()'s jitted body and its static settings, to compile it ahead of time.
from mmjax.generate.decode import Settings, decode_jit, prefill  # noqa: E402
from mmjax.io.hf import init_variables  # noqa: E402
from mmjax.io.hf_config import to_mmjax  # noqa: E402
from mmjax.models import build_model  # noqa: E402

GPT2_SMALL = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                  architectures=["GPT2LMHeadModel"], model_type="gpt2")
NEVER = -1   # the EOS id: no token equals it, so every row runs to N


def gpt2_small(max_new: int, dtype: str = "float32"):
  del max_new   # its 1024 positions hold any N here
  config = to_mmjax(GPT2_SMALL)
  with config.unlocked():
    config.model.dtype = dtype
  model = build_model(config)
  return model, {"params": init_variables(model, config)}, None


def captioner(max_new: int, dtype: str = "float32"):
  config = load_config("caption_shapes")
  with config.unlocked():
    config.model.dtype = dtype
    # Its tokenizer only sizes the vocabulary (256 words); its 16-token position table is
    # lengthened so that 128 new tokens fit.
    config.model.text.vocab_size = config.data.vocab_size
    config.model.text.max_len = 1 + max_new
  model = build_model(config)
  image = np.zeros((1, config.data.image_size, config.data.image_size, 3), np.float32)
  batch = {"image": image, "text": np.zeros((1, 4), np.int32),
           "text_mask": np.ones((1, 4), np.int32)}
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, batch)
  return model, {"params": variables["params"]}, config.data.image_size


def _block(tree):
  return jax.tree.map(lambda x: x.block_until_ready(), tree)


def best_of(repeats: int, run) -> tuple[float, float]:
  """(wall, CPU) seconds of `run`, each the least of `repeats` calls (other processes only
  ever slow it). CPU: this process's user + system time over all its threads, which load
  from other processes on a shared machine inflates far less than the wall time."""
  wall, cpu = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    run()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return min(wall), min(cpu)


def time_kv(model, variables, ids, mask, images, n: int, repeats: int) -> tuple[float, float]:
  """What `decode(..., max_new_tokens=n)` runs: its jitted body, compiled ahead of time so
  that the one timed call is all execution (a warm-up call would cost a whole decode)."""
  ids, mask, rng = jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0)
  images = None if images is None else jnp.asarray(images)
  compiled = decode_jit.lower(model, Settings("greedy", n, NEVER, 0), variables, ids, mask, rng,
                           images).compile()
  out = compiled(variables, ids, mask, rng, images)
  assert out.tokens.shape == (ids.shape[0], 1, n), out.tokens.shape
  return best_of(repeats, lambda: _block(compiled(variables, ids, mask, rng, images)))


@functools.partial(jax.jit, static_argnums=(0,))
def _recompute(model, variables, ids, mask, images, steps):
  """`steps` greedy tokens, each from a full forward over the static [B, P + N] buffer."""
  rows = jnp.arange(ids.shape[0])
  image_tokens = None
  if images is not None:
    image_tokens = model.apply(variables, images, method="image_memory")

  def body(_, carry):
    ids, mask = carry
    if image_tokens is None:
      logits = model.apply(variables, ids, mask, method="encode_text")[1]["logits"]
    else:
      logits = model.apply(variables, ids, mask, image_tokens=image_tokens,
                           method="decode_text")["logits"]
    last = mask.sum(axis=1) - 1
    token = jnp.argmax(logits[rows, last], axis=-1).astype(ids.dtype)
    return ids.at[rows, last + 1].set(token), mask.at[rows, last + 1].set(1)

  return jax.lax.fori_loop(0, steps, body, (ids, mask))


def time_recompute(model, variables, ids, mask, images, n: int, steps: int,
                   repeats: int) -> tuple[float, float]:
  b, p = ids.shape
  buf_ids = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(ids)
  buf_mask = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(mask)
  images = None if images is None else jnp.asarray(images)
  args = (variables, buf_ids, buf_mask, images, jnp.int32(steps))
  compiled = _recompute.lower(model, *args).compile()
  return best_of(repeats, lambda: _block(compiled(*args)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prefill(model, all_logits: bool, variables, ids, mask):
  """-> (next-token logits [B, V], the cache) after the prompts (see --prefill)."""
  if not all_logits:
    return prefill(model, variables, ids, mask, ids.shape[1])
  cache = model.text_tower.empty_cache(ids.shape[0], ids.shape[1])
  out = model.apply(variables, ids, mask, cache, method="decode_text")       # [B, P, V]
  return out["logits"][jnp.arange(ids.shape[0]), mask.sum(axis=1) - 1], out["cache"]


def time_prefill(model, variables, ids, mask, all_logits: bool,
                 repeats: int) -> tuple[float, float]:
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  compiled = _prefill.lower(model, all_logits, variables, ids, mask).compile()
  _block(compiled(variables, ids, mask))
  return best_of(repeats, lambda: _block(compiled(variables, ids, mask)))


def prefill_rows(name: str, model, variables, b: int, prompt: int, repeats: int) -> None:
  """Print the --prefill lines of one (model, batch, prompt length)."""
  ids = np.random.default_rng(b).integers(1, model.text_tower.vocab_size, (b, prompt))
  ids, mask = ids.astype(np.int32), np.ones((b, prompt), np.int32)
  got = {}
  for impl, all_logits in (("mmjax_prefill", False), ("mmjax_prefill_all_logits", True)):
    got[impl] = time_prefill(model, variables, ids, mask, all_logits, repeats)
    print(json.dumps({"model": name, "impl": impl, "batch": b, "prompt": prompt,
                      "seconds": round(got[impl][0], 4),
                      "cpu_seconds": round(got[impl][1], 4)}), flush=True)
  (new, new_cpu), (old, old_cpu) = got["mmjax_prefill"], got["mmjax_prefill_all_logits"]
  print(json.dumps({"model": name, "batch": b, "prompt": prompt,
                    "all_logits_over_prefill": round(old / new, 2),
                    "all_logits_over_prefill_cpu": round(old_cpu / new_cpu, 2)}), flush=True)


def time_torch(ids: np.ndarray, n: int, state: dict, repeats: int) -> tuple[float, float]:
  import torch   # pylint: disable=g-import-not-at-top
  import transformers   # pylint: disable=g-import-not-at-top
  if "model" not in state:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{k: v for k, v in GPT2_SMALL.items()
                                        if k not in ("architectures", "model_type")})
    state["model"] = transformers.GPT2LMHeadModel(config).eval()
  model = state["model"]
  x = torch.tensor(ids, dtype=torch.long)
  run = lambda k: model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k,
                                min_new_tokens=k, do_sample=False, pad_token_id=0)
  shapes = []
  with torch.no_grad():
    run(2)    # warm-up: the first call's one-time costs
    seconds = best_of(repeats, lambda: shapes.append(tuple(run(n).shape)))
  assert shapes[-1] == (x.shape[0], x.shape[1] + n), shapes
  return seconds


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="gpt2,caption")
  p.add_argument("--batch", default="1,16")
  p.add_argument("--new", default="32,64,128")
  p.add_argument("--prompt", default="8", help="prompt tokens (gpt2), comma-separated")
  p.add_argument("--prefill", action="store_true",
                 help="time the prefill alone, LM head at the last token vs at every one")
  p.add_argument("--recompute-steps", type=int, default=2)
  p.add_argument("--repeats", type=int, default=2, help="timed calls per setting; the best")
  p.add_argument("--only", choices=("mmjax", "torch"), default=None)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="mmjax's compute dtype (model.dtype; params stay float32)")
  args = p.parse_args()
  batches = [int(x) for x in args.batch.split(",")]
  news = [int(x) for x in args.new.split(",")]
  prompts = [int(x) for x in args.prompt.split(",")]
  torch_state = {}
  for name in args.models.split(","):
    model, variables, image_size = {"gpt2": gpt2_small, "caption": captioner}[name](
        max(news), args.dtype)
    vocab = model.text_tower.vocab_size
    if args.prefill:
      for b in batches:
        for prompt in prompts:
          prefill_rows(name, model, variables, b, prompt, args.repeats)
      continue
    for b, p_len in itertools.product(batches, [1] if image_size else prompts):
      r = np.random.default_rng(b)
      ids = r.integers(1, vocab, (b, p_len)).astype(np.int32)
      mask = np.ones_like(ids)
      images = None
      if image_size:
        images = r.normal(size=(b, image_size, image_size, 3)).astype(np.float32)
      for n in news:
        got = {}
        if args.only != "torch":
          got["mmjax_kv"] = (time_kv(model, variables, ids, mask, images, n, args.repeats), n)
          steps = min(n, args.recompute_steps)
          got["mmjax_recompute"] = (
              time_recompute(model, variables, ids, mask, images, n, steps, args.repeats), steps)
        if args.only != "mmjax" and name == "gpt2":
          got["torch_hf"] = (time_torch(ids, n, torch_state, args.repeats), n)
        rate, cpu_rate = {}, {}
        for impl, ((seconds, cpu_seconds), steps) in got.items():
          rate[impl], cpu_rate[impl] = b * steps / seconds, b * steps / cpu_seconds
          print(json.dumps({"model": name, "impl": impl, "dtype": args.dtype, "batch": b,
                            "prompt": p_len, "new_tokens": n,
                            "steps_timed": steps, "seconds": round(seconds, 3),
                            "tokens_per_s": round(rate[impl], 2),
                            "cpu_seconds": round(cpu_seconds, 3),
                            "tokens_per_cpu_s": round(cpu_rate[impl], 2)}), flush=True)
        summary = {"model": name, "dtype": args.dtype, "batch": b, "prompt": p_len,
                   "new_tokens": n}
        for other, key in (("mmjax_recompute", "kv_over_recompute"), ("torch_hf", "kv_over_torch")):
          if "mmjax_kv" in rate and other in rate:
            summary[key] = round(rate["mmjax_kv"] / rate[other], 2)
            summary[key + "_cpu"] = round(cpu_rate["mmjax_kv"] / cpu_rate[other], 2)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
