"""Captioning and VQA by generation: the decoder (cross-attention, prefix-LM), its KV-cache
decoding from images, the caption / lm objectives, the prefix data path, the caption
metrics (CIDEr-D by hand), and one tiny end-to-end `mmjax train` of caption_shapes."""
import functools
import json
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import cli
from mmjax import objectives
from mmjax.data.pipeline import _Collate
from mmjax.evals import captioning
from mmjax.generate import decode
from mmjax.models.model import MultimodalModel, next_token_targets
from mmjax.models.registry import build_model
from mmjax.models.text import TextEncoder
from mmjax.models.vit import ViT

V, MAX_LEN, P, N, B = 31, 16, 5, 6, 3
PROMPT_LENGTHS = (5, 3, 1)
MODES = ("cross", "cross+prefix")


@functools.lru_cache(maxsize=None)
def tiny_captioner(prefix_lm: bool):
  image = ViT(image_size=8, patch=4, width=16, depth=1, heads=2, mlp_dim=32)
  text = TextEncoder(V, MAX_LEN, width=32, depth=2, heads=4, mlp_dim=64, pool="eos",
                     causal=True, head="lm", cross=True)
  model = MultimodalModel(image, text, caption=True, prefix_lm=prefix_lm)
  params = jax.jit(model.init)(jax.random.key(0), inputs())["params"]
  # Logits spread over several units (not the init's ~0.01): no near-ties to flip argmax.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 60 if "token_embed" in jax.tree_util.keystr(path) else x, params)
  return model, {"params": params}


def inputs():
  """A batch of 3 images with right-padded prompts of PROMPT_LENGTHS, junk in the padding."""
  r = np.random.default_rng(0)
  mask = (np.arange(P)[None] < np.array(PROMPT_LENGTHS)[:, None]).astype(np.int32)
  return dict(image=r.normal(size=(B, 8, 8, 3)).astype(np.float32),
              text=r.integers(0, V, (B, P)).astype(np.int32), text_mask=mask,
              prefix_len=mask.sum(1).astype(np.int32))


@pytest.fixture(params=MODES)
def captioner(request):
  return request.param, *tiny_captioner(prefix_lm=request.param == "cross+prefix")


def full_logits(model, variables, images, seqs, prefix_lens):
  """[B, T, V]: every row's logits recomputed from scratch on its whole sequence (no
  cache), the rows right-padded to one length (padding after a token does not change it)."""
  ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
  mask = np.zeros_like(ids)
  for b, seq in enumerate(seqs):
    ids[b, :len(seq)], mask[b, :len(seq)] = seq, 1

  @jax.jit
  def run(variables, images, ids, mask, prefix):
    tokens = model.apply(variables, images, method="image_memory")
    return model.apply(variables, ids, mask, image_tokens=tokens,
                       prefix_len=prefix if model.prefix_lm else None,
                       method="decode_text")["logits"]
  return np.asarray(run(variables, images, ids, mask, np.asarray(prefix_lens)))


# --- the decoder ------------------------------------------------------------------

def test_decoder_output_does_not_depend_on_padding_after_it(captioner):
  _, model, variables = captioner
  batch = inputs()
  prefix = batch["prefix_len"] if model.prefix_lm else None
  logits = jax.jit(lambda images, ids, mask: model.apply(
      variables, ids, mask, prefix_len=prefix, method="decode_text",
      image_tokens=model.apply(variables, images, method="image_memory"))["logits"])
  run = lambda ids, mask: logits(batch["image"], ids, mask)
  short = run(batch["text"], batch["text_mask"])
  junk = np.random.default_rng(5).integers(0, V, (B, 4)).astype(np.int32)
  longer = run(np.concatenate([batch["text"], junk], 1),
               np.concatenate([batch["text_mask"], np.zeros_like(junk)], 1))
  chex.assert_shape(longer, (B, P + 4, V))
  real = batch["text_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(longer)[:, :P][real], np.asarray(short)[real],
                             atol=1e-5)
  # The image matters: another image changes the logits.
  moved = logits(batch["image"][::-1], batch["text"], batch["text_mask"])
  assert np.abs(np.asarray(moved) - np.asarray(short))[real].max() > 1e-3


def test_prefix_lm_attends_both_ways_within_the_prefix_only():
  model, variables = tiny_captioner(prefix_lm=True)
  batch = inputs()
  tokens = model.apply(variables, batch["image"], method="image_memory")
  ids, mask = batch["text"][:1], batch["text_mask"][:1]        # 5 real tokens
  logits = jax.jit(lambda ids, n: model.apply(variables, ids, mask, image_tokens=tokens[:1],
                                               prefix_len=n, method="decode_text")["logits"])
  run = lambda ids, n: np.asarray(logits(ids, np.array([n]))[0])
  changed = ids.copy()
  changed[0, 2] = (ids[0, 2] + 1) % V
  # Prefix of 3: token 0 sees token 2 (changed), so its output moves ...
  assert np.abs(run(changed, 3)[0] - run(ids, 3)[0]).max() > 1e-4
  # ... while with no prefix it is causal and does not.
  np.testing.assert_allclose(run(changed, 0)[0], run(ids, 0)[0], atol=1e-6)
  # Token 3 (after the prefix) never influences token 2.
  changed = ids.copy()
  changed[0, 3] = (ids[0, 3] + 1) % V
  np.testing.assert_allclose(run(changed, 3)[2], run(ids, 3)[2], atol=1e-6)


def test_untied_output_embedding_has_its_own_matrix():
  params = lambda tie: jax.eval_shape(tiny_captioner(False)[0].clone(
      text_tower=tiny_captioner(False)[0].text_tower.clone(tie_embed=tie)).init,
      jax.random.key(0), inputs())["params"]["text_tower"]
  chex.assert_shape(params(False)["lm_head"]["kernel"], (32, V))
  assert "lm_head" not in params(True)


# --- decoding from images -----------------------------------------------------------

def test_cached_decoding_equals_full_recomputation(captioner):
  """Greedy tokens and every step's logits of the KV-cache decoder equal those of
  recomputing the whole sequence each step (<= 1e-5)."""
  _, model, variables = captioner
  batch = inputs()
  images, ids, mask = batch["image"], batch["text"], batch["text_mask"]
  got = decode(model, variables, ids, mask, images=images, max_new_tokens=N, eos_id=-1,
               pad_id=0, method="greedy")
  chex.assert_shape(got.tokens, (B, 1, N))
  # The cached path step by step, on the tokens greedy chose.
  tokens = model.apply(variables, images, method="image_memory")
  cache = model.text_tower.empty_cache(B, P + N)
  out = jax.jit(lambda v, ids, mask, cache, tokens: model.apply(
      v, ids, mask, cache, image_tokens=tokens,
      prefix_len=mask.sum(1) if model.prefix_lm else None, method="decode_text"))(
          variables, ids, mask, cache, tokens)
  assert len(out["cache"].cross_keys) == 2          # projected once, kept per block
  last = mask.sum(1) - 1
  cached = [np.asarray(out["logits"])[np.arange(B), last]]
  cache = out["cache"]
  step = jax.jit(lambda v, tok, cache: model.apply(v, tok, jnp.ones_like(tok), cache,
                                                   method="decode_text"))
  for t in range(N - 1):
    o = step(variables, got.tokens[:, 0, t:t + 1], cache)
    cached.append(np.asarray(o["logits"][:, 0]))
    cache = o["cache"]
  seqs = [list(ids[b, :mask[b].sum()]) + list(np.asarray(got.tokens[b, 0])) for b in range(B)]
  full = full_logits(model, variables, images, seqs, mask.sum(1))
  for b in range(B):
    n = mask[b].sum()
    want = np.asarray(full[b])[n - 1:n - 1 + N]
    np.testing.assert_allclose(np.stack([c[b] for c in cached]), want, atol=1e-5)
    assert list(np.argmax(want, -1)) == list(np.asarray(got.tokens[b, 0]))


def test_beam_of_one_is_greedy_and_samples_repeat_the_image():
  model, variables = tiny_captioner(prefix_lm=True)
  batch = inputs()
  kw = dict(images=batch["image"], max_new_tokens=N, eos_id=-1, pad_id=0)
  greedy = decode(model, variables, batch["text"], batch["text_mask"], method="greedy", **kw)
  beam = decode(model, variables, batch["text"], batch["text_mask"], method="beam",
                num_beams=1, **kw)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  # top_k=1 sampling is greedy on every one of the repeated rows.
  sampled = decode(model, variables, batch["text"], batch["text_mask"], method="sample",
                   rng=jax.random.key(3), top_k=1, num_return=2, **kw)
  chex.assert_shape(sampled.tokens, (B, 2, N))
  np.testing.assert_array_equal(sampled.tokens, np.repeat(greedy.tokens, 2, axis=1))
  beams = decode(model, variables, batch["text"], batch["text_mask"], method="beam",
                 num_beams=3, num_return=3, **kw)
  chex.assert_shape(beams.tokens, (B, 3, N))
  assert (np.diff(np.asarray(beams.scores), axis=1) <= 1e-6).all()   # best first


def test_rows_that_reach_eos_early_are_not_extended():
  model, variables = tiny_captioner(prefix_lm=False)
  batch = inputs()
  kw = dict(images=batch["image"], max_new_tokens=N, pad_id=0, method="greedy")
  free = decode(model, variables, batch["text"], batch["text_mask"], eos_id=-1, **kw)
  eos = int(free.tokens[0, 0, 1])        # row 0's second token becomes its EOS
  got = decode(model, variables, batch["text"], batch["text_mask"], eos_id=eos, **kw)
  toks = np.asarray(got.tokens[:, 0])
  for b in range(B):
    row = list(np.asarray(free.tokens[b, 0]))
    stop = row.index(eos) + 1 if eos in row else N
    assert list(toks[b, :stop]) == row[:stop]
    assert (toks[b, stop:] == 0).all()
    assert int(got.lengths[b, 0]) == stop
  assert int(got.lengths[0, 0]) <= 2


def test_decode_errors_name_the_problem():
  model, variables = tiny_captioner(prefix_lm=False)
  batch = inputs()
  with pytest.raises(ValueError, match="cross-attends to images"):
    decode(model, variables, batch["text"], batch["text_mask"], max_new_tokens=2, eos_id=3,
           pad_id=0)
  with pytest.raises(ValueError, match=r"images \(2, 8, 8, 3\)"):
    decode(model, variables, batch["text"], batch["text_mask"], images=batch["image"][:2],
           max_new_tokens=2, eos_id=3, pad_id=0)


# --- objectives -----------------------------------------------------------------------

def test_next_token_targets_skip_padding_and_the_prefix():
  ids = np.array([[2, 7, 8, 3, 0], [2, 5, 3, 9, 3]])
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
  targets, w = next_token_targets(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_array_equal(targets, [[7, 8, 3, 0, 0], [5, 3, 9, 3, 0]])
  np.testing.assert_array_equal(w, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
  # A 3-token prefix ([CLS] q [SEP]): only the answer and its [SEP] are targets.
  _, w = next_token_targets(jnp.asarray(ids), jnp.asarray(mask), jnp.array([3, 3]))
  np.testing.assert_array_equal(w, [[0, 0, 1, 0, 0], [0, 0, 1, 1, 0]])


@pytest.mark.parametrize("name", ["caption", "lm"])
def test_next_token_loss_counts_real_tokens_only(name):
  r = np.random.default_rng(0)
  logits = r.normal(size=(2, 4, 7)).astype(np.float32)
  targets = r.integers(0, 7, (2, 4))
  weights = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.float32)
  out = lambda lg, tg: {f"{name}_logits": jnp.asarray(lg), f"{name}_targets": jnp.asarray(tg),
                        f"{name}_weights": jnp.asarray(weights)}
  loss, metrics = objectives.get(name)(out(logits, targets), {})
  logp = jax.nn.log_softmax(logits)
  want = -np.mean([logp[0, 0, targets[0, 0]], logp[0, 1, targets[0, 1]],
                   logp[1, 0, targets[1, 0]]])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # Padding contributes nothing: change its logits and targets.
  junk_logits, junk_targets = logits.copy(), targets.copy()
  junk_logits[weights == 0] = 50.0
  junk_targets[weights == 0] = 1
  np.testing.assert_allclose(objectives.get(name)(out(junk_logits, junk_targets), {})[0], loss,
                             rtol=1e-6)
  # Rows marked invalid (eval padding) count for nothing.
  loss_valid, _ = objectives.get(name)(out(logits, targets), {"valid": jnp.array([1.0, 0.0])})
  np.testing.assert_allclose(loss_valid, -np.mean([logp[0, 0, targets[0, 0]],
                                                   logp[0, 1, targets[0, 1]]]), rtol=1e-5)
  smoothed, _ = objectives.get(name)(out(logits, targets), {}, label_smoothing=0.1)
  assert abs(float(smoothed) - float(loss)) > 1e-4
  assert 0 <= float(metrics["acc"]) <= 1


def test_caption_and_contrastive_train_in_one_model():
  config = ml_collections.ConfigDict(dict(
      data=dict(image_size=8, max_len=8),
      model=dict(image=dict(variant="mu", patch=4),
                 text=dict(variant="mu", causal=True, head="lm", pool="eos", vocab_size=V),
                 decoder=dict(cross_attention=True, prefix_lm=False, tie_embed=True),
                 embed_dim=16),
      objectives=dict(contrastive=1.0, caption=2.0, lm=0.5)))
  model = build_model(config)
  batch = inputs()
  loss_fn = objectives.combined(dict(config.objectives))
  out, (loss, metrics) = jax.eval_shape(
      lambda b: (lambda o: (o, loss_fn(o, b)))(model.apply(model.init(jax.random.key(0), b), b)),
      batch)
  chex.assert_shape([out["caption_logits"], out["lm_logits"]], (B, P, V))
  chex.assert_shape(out["image_emb"], (B, 16))
  assert loss.shape == () and {"caption_loss", "lm_loss", "contrastive_loss"} <= set(metrics)
  with config.unlocked():
    config.model.text.causal = False
  with pytest.raises(ValueError, match="need a decoder"):
    build_model(config)


# --- data: a question as the decoder's prefix -------------------------------------------

class _Words:
  """A tokenizer stand-in: one id per word, [CLS]=2, [SEP]=3, [PAD]=0."""
  cls_id, sep_id, pad_id = 2, 3, 0

  def encode(self, texts, max_len):
    ids, mask = np.zeros((len(texts), max_len), np.int32), np.zeros((len(texts), max_len), np.int32)
    for row, t in enumerate(texts):
      seq = [2] + [10 + len(w) for w in t.split()][:max_len - 2] + [3]
      ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
    return ids, mask


def test_prefix_field_puts_the_question_before_the_answer():
  collate = _Collate(_Words(), 8, (0.5,) * 3, (0.5,) * 3, {}, text_field="answer",
                     prefix_field="question")
  batch = collate([dict(question="what colour is it?", answer="red"),
                   dict(question="how many?", answer="two")])
  np.testing.assert_array_equal(batch["text"], [[2, 14, 16, 12, 13, 3, 13, 3],
                                                [2, 13, 15, 3, 13, 3, 0, 0]])
  np.testing.assert_array_equal(batch["prefix_len"], [6, 4])
  np.testing.assert_array_equal(batch["text_mask"].sum(1), [8, 6])
  with pytest.raises(Exception, match="data.max_len=8 cannot hold"):
    collate([dict(question="one two three four five six", answer="red")])


# --- metrics ------------------------------------------------------------------------------

def test_cider_d_matches_a_hand_computed_value():
  # Two images, one reference each; every n-gram occurs in one image: idf = ln 2.
  # Image 1, exact: cosine 1 for n = 1, 2 and no 3-, 4-grams: 10 * (1 + 1) / 4 = 5.
  # Image 2, "c" for "c d": unigram cosine 1 / sqrt 2, length penalty exp(-1 / 72).
  want = (5.0 + 10 * math.exp(-1 / 72) / math.sqrt(2) / 4) / 2
  assert captioning.cider_d(["a b", "c"], [["a b"], ["c d"]]) == pytest.approx(want, rel=1e-9)
  # Clipping: "c c" earns c's reference weight once (dot ln2^2 over norms 2 ln2, sqrt2 ln2).
  want = (5.0 + 10 * 1 / (2 * math.sqrt(2)) / 4) / 2
  assert captioning.cider_d(["a b", "c c"], [["a b"], ["c d"]]) == pytest.approx(want)
  # Punctuation and case do not matter.
  assert captioning.cider_d(["A b,", "c"], [["a b ,"], ["c d"]]) == pytest.approx(
      captioning.cider_d(["a b ,", "c"], [["a b ,"], ["c d"]]))


def test_caption_metrics_on_known_strings():
  refs = ["a small red circle", "a large blue square left of a small red cross",
          "a small green triangle"]
  gen = ["a small red circle", "a large blue square right of a small red cross",
         "a large green cross"]
  labels = dict(color=np.array([0, 2, 1]), shape=np.array([0, 1, 2]), size=np.array([0, 1, 0]),
                num_objects=np.array([1, 2, 1]))
  m = captioning.caption_metrics(gen, refs, labels)
  assert m["exact"] == pytest.approx(1 / 3)
  assert m["exact_single"] == pytest.approx(1 / 2)
  assert (m["attr_color"], m["attr_shape"], m["attr_size"], m["attr_all"]) == (1.0, 0.5, 0.5, 0.5)
  assert 0 < m["bleu"] < 100 and 0 < m["cider"] < 10
  perfect = captioning.caption_metrics(refs, refs)
  assert perfect["exact"] == 1.0 and perfect["bleu"] == pytest.approx(100.0)
  assert captioning.bleu(["a red circle, a blue cross"],
                         ["a red circle , a blue cross"]) == pytest.approx(100.0)
  assert captioning.attributes("a purple cross") == dict(color=4, shape=3, size=-1)


# --- end to end -------------------------------------------------------------------------

@pytest.mark.slow
def test_caption_shapes_tiny_trains_and_reports_generation_metrics(tmp_path):
  got = cli("train", "--config", "configs/caption_shapes.py:tiny", "--workdir",
            str(tmp_path / "cap"))
  assert got.returncode == 0, got.stderr[-2000:]
  rows = [json.loads(line) for line in (tmp_path / "cap" / "metrics.jsonl").open()]
  losses = [r["caption_loss"] for r in rows if r["kind"] == "train"]
  assert losses[-1] < 0.85 * losses[0], losses
  final = json.loads(got.stdout.strip().splitlines()[-1])
  for key in ("exact", "exact_single", "bleu", "cider", "attr_color", "attr_shape",
              "attr_size", "attr_all"):
    assert 0 <= final[f"caption_{key}"] <= (100 if key == "bleu" else 10)
