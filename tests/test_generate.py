"""Decoding a causal LM: the KV cache against full recomputation, greedy / sampling /
beam search properties, and token-for-token parity with transformers' GPT-2 generate."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import mmjax  # noqa: E402
from conftest import run_python  # noqa: E402
from mmjax.generate import beam, decode, filter_logits  # noqa: E402
from mmjax.generate.decode import Settings, decode_jit  # noqa: E402
from mmjax.models.model import MultimodalModel  # noqa: E402
from mmjax.models.text import TextEncoder  # noqa: E402

V, MAX_LEN, P, N = 37, 24, 6, 8     # vocabulary, context, prompt length, new tokens
PROMPT_LENGTHS = (6, 3, 1)


def tiny_lm():
  tower = TextEncoder(V, MAX_LEN, width=32, depth=2, heads=4, mlp_dim=64, pool="eos",
                      causal=True, act="gelu_tanh", ln_eps=1e-5, head="lm")
  model = MultimodalModel(image_tower=None, text_tower=tower)
  ids, mask = prompts()
  params = model.init(jax.random.key(0), ids, mask, method="encode_text")["params"]
  # Logits spread over several units (not the init's ~0.01): no near-ties to flip argmax.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 60 if "token_embed" in jax.tree_util.keystr(path) else x, params)
  return model, {"params": params}


def prompts():
  """[3, P] right-padded prompts of PROMPT_LENGTHS tokens, junk ids in the padding."""
  r = np.random.default_rng(0)
  mask = (np.arange(P)[None] < np.array(PROMPT_LENGTHS)[:, None]).astype(np.int32)
  return r.integers(0, V, (3, P)).astype(np.int32), mask


@pytest.fixture(scope="module")
def lm():
  return tiny_lm()


def full_logits(model, variables, ids, mask):
  return model.apply(variables, ids, mask, method="encode_text")[1]["logits"]


def rows(ids, mask):
  """Each row's real tokens."""
  return [list(i[m.astype(bool)]) for i, m in zip(np.asarray(ids), np.asarray(mask))]


def padded(seqs, length):
  ids = np.zeros((len(seqs), length), np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for b, s in enumerate(seqs):
    ids[b, :len(s)], mask[b, :len(s)] = s, 1
  return ids, mask


# --- the KV cache -----------------------------------------------------------------

def test_cached_decoding_gives_the_logits_of_full_recomputation(lm):
  model, variables = lm
  ids, mask = prompts()
  tower = model.text_tower
  cache = tower.empty_cache(3, P + N)
  # Prefill in two chunks (the second starts at a different offset in each row), then
  # one token per call.
  out = model.apply(variables, ids[:, :4], mask[:, :4], cache, method="decode_text")
  first = model.apply(variables, ids[:, 4:], mask[:, 4:], out["cache"], method="decode_text")
  assert list(first["cache"].index) == list(PROMPT_LENGTHS)
  seqs = rows(ids, mask)
  step_logits, cache = [], first["cache"]
  new = np.random.default_rng(1).integers(0, V, (3, N)).astype(np.int32)
  for t in range(N):
    o = model.apply(variables, new[:, t:t + 1], np.ones((3, 1), np.int32), cache,
                    method="decode_text")
    step_logits.append(o["logits"][:, 0])
    cache = o["cache"]
  assert list(cache.index) == [n + N for n in PROMPT_LENGTHS]
  # Every step against the full sequence recomputed from scratch.
  for t in range(N):
    full_ids, full_mask = padded([s + list(new[b, :t + 1]) for b, s in enumerate(seqs)], P + N)
    ref = full_logits(model, variables, full_ids, full_mask)
    last = full_mask.sum(1) - 1
    np.testing.assert_allclose(step_logits[t], ref[np.arange(3), last], atol=1e-5, rtol=0)
  # The prompt's own logits, prefilled, against one full call.
  ref = full_logits(model, variables, ids, mask)
  got = np.concatenate([out["logits"], first["logits"]], axis=1)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], np.asarray(ref)[real], atol=1e-5, rtol=0)


def test_a_real_tokens_output_does_not_depend_on_padding_after_it(lm):
  model, variables = lm
  ids, mask = prompts()
  more_ids = np.concatenate([ids, np.full((3, 5), 7, np.int32)], axis=1)  # junk padding
  more_mask = np.concatenate([mask, np.zeros((3, 5), np.int32)], axis=1)
  real = mask.astype(bool)
  for cached in (False, True):
    if cached:
      run = lambda i, m: model.apply(variables, i, m, model.text_tower.empty_cache(3, 16),
                                     method="decode_text")["logits"]
    else:
      run = lambda i, m: full_logits(model, variables, i, m)
    a, b = np.asarray(run(ids, mask)), np.asarray(run(more_ids, more_mask))[:, :P]
    np.testing.assert_allclose(a[real], b[real], atol=1e-5, rtol=0)


def test_the_cache_is_a_pytree_with_the_batch_first(lm):
  model, _ = lm
  cache = model.text_tower.empty_cache(3, 10)
  leaves = jax.tree.leaves(cache)
  assert len(leaves) == 1 + 2 * 2 and all(x.shape[0] == 3 for x in leaves)
  assert cache.keys[0].shape == (3, 10, 4, 8)


# --- decoding -------------------------------------------------------------------

def run(lm, **kw):
  model, variables = lm
  ids, mask = prompts()
  kw = {"max_new_tokens": N, "eos_id": V, "pad_id": 0, **kw}   # eos V: never generated
  return decode(model, variables, ids, mask, **kw)


def test_greedy_is_the_argmax_of_full_recomputation(lm):
  model, variables = lm
  got = run(lm)
  ids, mask = prompts()
  seqs = rows(ids, mask)
  for _ in range(N):
    full_ids, full_mask = padded(seqs, P + N)
    logits = np.asarray(full_logits(model, variables, full_ids, full_mask))
    last = logits[np.arange(3), full_mask.sum(1) - 1]
    top2 = np.sort(last, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, "near-tie: the test model is not peaky"
    seqs = [s + [int(t)] for s, t in zip(seqs, last.argmax(1))]
  assert got.tokens.shape == (3, 1, N)
  np.testing.assert_array_equal(got.tokens[:, 0], [s[-N:] for s in seqs])
  assert (got.lengths == N).all()


def test_beam_size_one_top_k_one_and_temperature_to_zero_are_greedy(lm):
  greedy = run(lm).tokens
  for kw in (dict(method="beam", num_beams=1),
             dict(method="sample", top_k=1, rng=jax.random.key(3)),
             dict(method="sample", temperature=1e-4, rng=jax.random.key(4)),
             dict(method="sample", top_p=1e-6, rng=jax.random.key(5))):
    np.testing.assert_array_equal(run(lm, **kw).tokens, greedy, err_msg=str(kw))


def test_the_same_key_gives_the_same_samples_and_other_keys_differ(lm):
  kw = dict(method="sample", temperature=3.0, num_return=2)
  a = run(lm, rng=jax.random.key(0), **kw).tokens
  assert a.shape == (3, 2, N)
  np.testing.assert_array_equal(a, run(lm, rng=jax.random.key(0), **kw).tokens)
  assert not np.array_equal(a, run(lm, rng=jax.random.key(1), **kw).tokens)
  assert not np.array_equal(a[:, 0], a[:, 1])   # samples of one prompt are independent


@pytest.mark.parametrize("method", ["greedy", "sample", "beam"])
def test_a_row_that_hits_eos_stops_and_is_padded(lm, method):
  kw = dict(method=method, rng=jax.random.key(2), temperature=2.0, num_beams=3,
            num_return=3 if method == "beam" else 1)
  free = np.asarray(run(lm, **kw).tokens)
  eos = int(free[1, 0, 2])                 # the first row-1 sequence says it third
  got = run(lm, eos_id=eos, pad_id=V - 1, **kw)
  tokens, length = np.asarray(got.tokens), np.asarray(got.lengths)
  if method != "beam":
    # Each row follows the free run up to its own first EOS, then only padding.
    ends = [list(seq).index(eos) + 1 if eos in seq else N for seq in free[:, 0]]
    assert ends[1] <= 3 and length[:, 0].tolist() == ends
    for b in range(3):
      np.testing.assert_array_equal(tokens[b, 0, :ends[b]], free[b, 0, :ends[b]])
  else:   # EOS ends hypotheses, so the search takes other paths: check the form only
    assert (length < N).any()
  for b, i in np.ndindex(tokens.shape[:2]):
    seq, n = tokens[b, i], length[b, i]
    assert eos not in seq[:n - 1] and (seq[n:] == V - 1).all()
    assert n == N or seq[n - 1] == eos


def test_one_compilation_serves_prompts_of_any_content_and_stopping_step(lm):
  model, variables = lm
  run(lm, eos_id=3)
  size = decode_jit._cache_size()
  ids, mask = padded([[1, 2], [5, 6, 7, 8, 9, 10], [4]], P)
  decode(model, variables, ids, mask, max_new_tokens=N, eos_id=3, pad_id=0)
  assert decode_jit._cache_size() == size


def test_prompts_sharded_over_the_batch_decode_sharded_and_alike():
  code = """
import sys; sys.path.insert(0, "tests")
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from test_generate import tiny_lm, padded, N
from mmjax.generate import decode
model, variables = tiny_lm()
ids, mask = padded([[1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [11, 12]], 6)
batch = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
for kw in (dict(), dict(method="beam", num_beams=3, num_return=2),
           dict(method="sample", rng=jax.random.key(1), num_return=2)):
  one = decode(model, variables, ids, mask, max_new_tokens=N, eos_id=3, pad_id=0, **kw)
  two = decode(model, variables, jax.device_put(ids, batch), jax.device_put(mask, batch),
               max_new_tokens=N, eos_id=3, pad_id=0, **kw)
  assert two.tokens.sharding.spec == PartitionSpec("data"), two.tokens.sharding
  np.testing.assert_array_equal(one.tokens, two.tokens)
  np.testing.assert_allclose(one.scores, two.scores, atol=1e-5)
print("sharded ok")
"""
  r = run_python(code, devices=2, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "sharded ok" in r.stdout


def test_top_p_keeps_the_fewest_most_likely_tokens_reaching_p():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, **kw)))[0].tolist()
  assert kept(top_p=0.75) == [False, True, False, True]
  assert kept(top_p=0.85) == [False, True, True, True]
  assert kept(top_p=1.0) == [True] * 4
  assert kept(top_k=1) == [False, True, False, False]
  assert kept(top_k=3, top_p=0.6) == [False, True, False, True]


@pytest.mark.parametrize("kw, match", [
    (dict(method="nucleus"), "unknown decoding method"),
    (dict(method="sample"), "PRNG key"),
    (dict(method="sample", rng=jax.random.key(0), top_p=1.5), "top_p"),
    (dict(method="sample", rng=jax.random.key(0), temperature=0.0), "temperature"),
    (dict(method="beam", num_beams=0), "num_beams"),
    (dict(max_new_tokens=MAX_LEN), "context"),
])
def test_bad_settings_are_one_line_errors(lm, kw, match):
  with pytest.raises(ValueError, match=match):
    run(lm, **kw)


def test_bad_prompts_are_errors(lm):
  model, variables = lm
  ids, mask = prompts()
  with pytest.raises(ValueError, match="at least one token"):
    decode(model, variables, ids, mask * 0, max_new_tokens=2, eos_id=1, pad_id=0)
  with pytest.raises(ValueError, match="right-padded"):
    decode(model, variables, ids, mask[:, ::-1], max_new_tokens=2, eos_id=1, pad_id=0)


def test_beam_search_steps_the_model_only_for_tokens_it_then_chooses():
  """N tokens take N - 1 model steps (the first comes from the prompts' logits); none
  for one token; and none after every prompt has stopped taking hypotheses."""
  calls = []
  peaked = jnp.zeros((6,)).at[1].set(10.0)      # token 1 all but certain

  def step(tokens, cache):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.broadcast_to(peaked, (tokens.shape[0], 6)), cache

  def steps(n, eos):
    calls.clear()
    s = Settings("beam", n, eos, 0, num_beams=2)
    logits, cache = jnp.tile(peaked, (3, 1)), jnp.zeros((3, 4))
    tokens, _ = jax.jit(lambda l, c: beam.search(step, l, c, s))(logits, cache)
    jax.block_until_ready(tokens)
    jax.effects_barrier()
    return len(calls), np.asarray(tokens)

  assert steps(5, eos=99)[0] == 4      # no EOS: every prompt runs to the 5th token
  assert steps(1, eos=99)[0] == 0
  # EOS (token 1) first: one hypothesis ends at token 0, the other at token 1, and the
  # running beams (log p ~ -10 a token) cannot beat them: all done after 2 tokens, 1 step.
  count, tokens = steps(5, eos=1)
  assert count == 1
  assert (tokens[:, :, 2:] == 0).all() and (tokens[:, 0, 0] == 1).all()


# --- parity with transformers ---------------------------------------------------------

def test_gpt2_generates_what_transformers_generates(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  vocab, n_new = 50, 10
  cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2,
                                n_head=4, bos_token_id=0, eos_token_id=1, pad_token_id=1)
  hf = transformers.GPT2LMHeadModel(cfg)
  with torch.no_grad():   # logits spread over units: no near-ties between frameworks
    for w in hf.parameters():
      if w.ndim >= 2:
        w.mul_(12.0)
  hf = hf.eval()
  hf.save_pretrained(tmp_path / "gpt2")
  p = mmjax.from_pretrained(tmp_path / "gpt2")
  seqs = [[5, 9, 2, 33, 7, 12], [20, 3], [41, 8, 8, 15]]
  ids, mask = padded(seqs, 6)

  def hf_generate(seq, eos, **kw):
    out = hf.generate(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=int),
                      max_new_tokens=n_new, do_sample=False, eos_token_id=eos,
                      pad_token_id=cfg.pad_token_id, return_dict_in_generate=True,
                      output_scores=True, **kw)
    return out.sequences[:, len(seq):].numpy(), out

  def ours(eos, **kw):
    return decode(p.model, {"params": p.params}, ids, mask, max_new_tokens=n_new, eos_id=eos,
                  pad_id=cfg.pad_token_id, **kw)

  # An EOS that greedy decoding of the first prompt produces mid-way, so that rows stop
  # at different steps.
  free = hf_generate(seqs[0], vocab + 1)[0][0]
  eos = int(free[2])
  greedy = ours(eos)
  for b, seq in enumerate(seqs):
    want, _ = hf_generate(seq, eos)
    got = np.asarray(greedy.tokens[b, 0])
    np.testing.assert_array_equal(got[:want.shape[1]], want[0], err_msg=f"greedy row {b}")
    assert (got[want.shape[1]:] == cfg.pad_token_id).all()
  # HF's default length penalty, and one that favours long hypotheses (it also changes
  # when a prompt stops taking finished ones).
  stopped_early = 0
  for penalty in (1.0, 2.0):
    beams = ours(eos, method="beam", num_beams=4, num_return=4, length_penalty=penalty)
    for b, seq in enumerate(seqs):
      want, out = hf_generate(seq, eos, num_beams=4, num_return_sequences=4,
                              length_penalty=penalty)
      got = np.asarray(beams.tokens[b])
      msg = f"beams, length_penalty {penalty}, row {b}"
      np.testing.assert_array_equal(got[:, :want.shape[1]], want, err_msg=msg)
      assert (got[:, want.shape[1]:] == cfg.pad_token_id).all()
      np.testing.assert_allclose(beams.scores[b], out.sequences_scores.numpy(), atol=1e-4,
                                 err_msg=msg)
      stopped_early += int((np.asarray(beams.lengths[b]) < n_new).sum())
  assert stopped_early, "no hypothesis ended at EOS: the parity test would miss per-beam EOS"
  assert len(set(np.asarray(greedy.lengths[:, 0]).tolist())) > 1, "rows stop together"
