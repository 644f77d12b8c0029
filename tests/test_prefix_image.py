"""The PaliGemma-style decoder (model.decoder.image_prefix): the image tokens are the first
tokens of the decoder's input, attended both ways with the text prefix, the rest causal.
Its outputs and loss, its attention pattern, KV-cache decoding against recomputation
(greedy and beam), its config errors, and one tiny train -> generate -> export run."""
import functools
import json

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

import mmjax
from conftest import cli
from mmjax.deploy.export import has_decoder
from mmjax.generate import beam, decode
from mmjax.generate.decode import Settings, prefill, step
from mmjax.models.layers import Encoder
from mmjax.models.model import MultimodalModel, next_token_targets
from mmjax.models.registry import build_model
from mmjax.models.text import TextEncoder
from mmjax.models.vit import ViT

V, MAX_LEN, P, N, B = 31, 16, 5, 6, 3
M = 5                            # image tokens: a 2x2 grid of patches and [CLS]
PROMPT_LENGTHS = (5, 3, 1)
MODES = ("image", "image+question")     # the image alone is the prefix, or with the prompt


@functools.lru_cache(maxsize=None)
def tiny(prefix_lm: bool):
  image = ViT(image_size=8, patch=4, width=16, depth=1, heads=2, mlp_dim=32)
  text = TextEncoder(V, MAX_LEN, width=32, depth=2, heads=4, mlp_dim=64, pool="eos",
                     causal=True, head="lm", image_prefix=M)
  model = MultimodalModel(image, text, caption=True, prefix_lm=prefix_lm)
  params = jax.jit(model.init)(jax.random.key(0), inputs())["params"]
  # Logits spread over several units (not the init's ~0.01): no near-ties to flip argmax.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 60 if "token_embed" in jax.tree_util.keystr(path) else x, params)
  return model, {"params": params}


def inputs():
  """3 images with right-padded texts of PROMPT_LENGTHS real tokens, junk in the padding."""
  r = np.random.default_rng(0)
  mask = (np.arange(P)[None] < np.array(PROMPT_LENGTHS)[:, None]).astype(np.int32)
  return dict(image=r.normal(size=(B, 8, 8, 3)).astype(np.float32),
              text=r.integers(0, V, (B, P)).astype(np.int32), text_mask=mask,
              prefix_len=np.array([3, 2, 1], np.int32))


@pytest.fixture(params=MODES)
def mode(request):
  return tiny(prefix_lm=request.param == "image+question")


@functools.lru_cache(maxsize=None)
def _decoder_fn(model):
  """jit(variables, images, ids, mask, prefix_len -> the decoder's text logits), no cache."""
  def run(variables, images, ids, mask, prefix):
    tokens = model.apply(variables, images, method="image_memory")
    return model.apply(variables, ids, mask, image_tokens=tokens, prefix_len=prefix,
                       method="decode_text")["logits"]
  return jax.jit(run)


def decoder_logits(model, variables, images, ids, mask, prefix):
  return np.asarray(_decoder_fn(model)(variables, images, ids, mask,
                                       prefix if model.prefix_lm else None))


# --- outputs and loss ---------------------------------------------------------------------

def test_outputs_are_the_texts_and_the_loss_skips_the_image_and_the_prefix():
  model, variables = tiny(prefix_lm=True)
  batch = inputs()
  text_params = variables["params"]["text_tower"]
  chex.assert_shape(text_params["image_in"]["kernel"], (16, 32))     # image -> text width
  assert "cross_attn" not in text_params["encoder"]["block_0"]

  def loss(params):
    out = model.apply({"params": params}, batch)
    return mmjax.objectives.get("caption")(out, batch)[0], out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  # Only text positions have logits: the M image positions predict nothing.
  chex.assert_shape(out["caption_logits"], (B, P, V))
  targets, weights = next_token_targets(batch["text"], batch["text_mask"], batch["prefix_len"])
  np.testing.assert_array_equal(out["caption_targets"], targets)
  np.testing.assert_array_equal(out["caption_weights"], weights)
  # Row 0 (5 real tokens, a 3-token prefix): targets at positions 2 and 3 only.
  np.testing.assert_array_equal(out["caption_weights"][0], [0, 0, 1, 1, 0])
  # The loss reaches the image tower through the prefix and the projection.
  for tower, name in (("text_tower", "image_in"), ("image_tower", "patch_embed")):
    assert np.abs(np.asarray(grads[tower][name]["kernel"])).max() > 0, name


def test_real_tokens_do_not_depend_on_padding_after_them(mode):
  model, variables = mode
  batch = inputs()
  short = decoder_logits(model, variables, batch["image"], batch["text"], batch["text_mask"],
                         batch["prefix_len"])
  junk = np.random.default_rng(5).integers(0, V, (B, 4)).astype(np.int32)
  longer = decoder_logits(model, variables, batch["image"],
                          np.concatenate([batch["text"], junk], 1),
                          np.concatenate([batch["text_mask"], np.zeros_like(junk)], 1),
                          batch["prefix_len"])
  chex.assert_shape(longer, (B, P + 4, V))
  real = batch["text_mask"].astype(bool)
  np.testing.assert_allclose(longer[:, :P][real], short[real], atol=1e-5)
  # The image matters: another image changes the text's logits.
  moved = decoder_logits(model, variables, batch["image"][::-1], batch["text"],
                         batch["text_mask"], batch["prefix_len"])
  assert np.abs(moved - short)[real].max() > 1e-3


# --- who attends to whom ------------------------------------------------------------------

def test_the_prefix_is_bidirectional_and_nothing_in_it_sees_the_answer():
  """The decoder's stack output over [image; text] (captured from its Encoder): image
  tokens see a prefix text token after them; no prefix position sees the answer."""
  model, variables = tiny(prefix_lm=True)
  batch = inputs()
  images, ids, mask = batch["image"][:1], batch["text"][:1], batch["text_mask"][:1]  # 5 real

  @jax.jit
  def hidden(ids, prefix):        # [M + P, D]
    tokens = model.apply(variables, images, method="image_memory")
    _, state = model.apply(variables, ids, mask, image_tokens=tokens, prefix_len=prefix,
                           method="decode_text",
                           capture_intermediates=lambda mdl, _: isinstance(mdl, Encoder))
    return state["intermediates"]["text_tower"]["encoder"]["__call__"][0][0]

  def changed(at):
    out = ids.copy()
    out[0, at] = (ids[0, at] + 1) % V
    return out

  run = lambda ids, n: np.asarray(hidden(ids, np.array([n], np.int32)))
  base3 = run(ids, 3)
  chex.assert_shape(base3, (M + P, 32))
  # Prefix = image + 3 text tokens: every image token sees text token 2 ...
  diff = np.abs(run(changed(2), 3) - base3).max(axis=1)
  assert (diff[:M] > 1e-4).all(), diff
  # ... and nothing up to the end of the prefix sees text token 3 (the answer's first).
  np.testing.assert_allclose(run(changed(3), 3)[:M + 3], base3[:M + 3], atol=1e-6)
  # Prefix = the image alone (a caption): the image sees no text, text token 0 the image.
  base0 = run(ids, 0)
  np.testing.assert_allclose(run(changed(0), 0)[:M], base0[:M], atol=1e-6)
  np.testing.assert_allclose(run(changed(2), 0)[:M + 2], base0[:M + 2], atol=1e-6)


# --- KV-cache decoding against recomputation ------------------------------------------

def test_cached_greedy_equals_recomputing_the_whole_sequence(mode):
  """Prefill [image; prompt] in one call, then one token per call: each step's logits
  equal those of the whole sequence recomputed (<= 1e-5), and greedy picks their argmax."""
  model, variables = mode
  batch = inputs()
  images, ids, mask = batch["image"], batch["text"], batch["text_mask"]
  got = decode(model, variables, ids, mask, images=images, max_new_tokens=N, eos_id=-1,
               pad_id=0, method="greedy")
  chex.assert_shape(got.tokens, (B, 1, N))

  start = jax.jit(lambda v, images, ids, mask: prefill(
      model, v, ids, mask, P + N, model.apply(v, images, method="image_memory")))
  next_logits = jax.jit(functools.partial(step, model))
  logits, cache = start(variables, images, ids, mask)
  chex.assert_shape(cache.keys[0], (B, M + P + N, 4, 8))        # the image's slots first
  steps = [logits]
  for t in range(N - 1):
    logits, cache = next_logits(variables, got.tokens[:, 0, t], cache)
    steps.append(logits)
  steps = np.stack(steps)                                          # [N, B, V]
  full_ids = np.zeros((B, P + N), np.int32)
  full_mask = np.zeros_like(full_ids)
  for b, n in enumerate(PROMPT_LENGTHS):
    full_ids[b, :n + N] = np.concatenate([ids[b, :n], np.asarray(got.tokens[b, 0])])
    full_mask[b, :n + N] = 1
  full = decoder_logits(model, variables, images, full_ids, full_mask,
                        np.array(PROMPT_LENGTHS, np.int32))
  for b, n in enumerate(PROMPT_LENGTHS):
    want = full[b, n - 1:n - 1 + N]                               # [N, V]
    np.testing.assert_allclose(steps[:, b], want, atol=1e-5)
    assert list(np.argmax(want, -1)) == list(np.asarray(got.tokens[b, 0]))


def _recompute_step(model, variables, tokens, state):
  """A decoding step without a cache: `tokens` [R] appended to each row of the state's
  ids, the whole [image; text] sequence run again -> (next-token logits [R, V], state)."""
  ids, mask, image_tokens, prefix = state
  rows, n = jnp.arange(ids.shape[0]), mask.sum(axis=1)
  ids, mask = ids.at[rows, n].set(tokens), mask.at[rows, n].set(1)
  logits = model.apply(variables, ids, mask, image_tokens=image_tokens, prefix_len=prefix,
                       method="decode_text")["logits"]
  return logits[rows, n], (ids, mask, image_tokens, prefix)


def test_cached_beam_search_equals_beam_search_by_recomputation():
  """The same beam search (mmjax.generate.beam) driven by full recomputation instead of
  the KV cache: the same beams, scores within 1e-5, with per-beam EOS at work."""
  model, variables = tiny(prefix_lm=True)
  batch = inputs()
  images, ids, mask = batch["image"], batch["text"], batch["text_mask"]
  greedy = decode(model, variables, ids, mask, images=images, max_new_tokens=N, eos_id=-1,
                  pad_id=0)
  eos = int(greedy.tokens[0, 0, 2])                 # an EOS that some beams reach
  k = 3
  got = decode(model, variables, ids, mask, images=images, max_new_tokens=N, eos_id=eos,
               pad_id=0, method="beam", num_beams=k, num_return=k)
  s = Settings("beam", N, eos, 0, num_beams=k, num_return=k)

  @jax.jit
  def by_recomputation(variables, images, ids, mask):
    tokens = model.apply(variables, images, method="image_memory")
    prefix = mask.sum(axis=1) if model.prefix_lm else None
    buf = jnp.zeros((B, P + N), jnp.int32).at[:, :P].set(ids * mask)
    buf_mask = jnp.zeros((B, P + N), jnp.int32).at[:, :P].set(mask)
    logits = model.apply(variables, buf, buf_mask, image_tokens=tokens, prefix_len=prefix,
                         method="decode_text")["logits"]
    first = logits[jnp.arange(B), mask.sum(axis=1) - 1]
    return beam.search(functools.partial(_recompute_step, model, variables), first,
                       (buf, buf_mask, tokens, prefix), s)

  want_tokens, want_scores = by_recomputation(variables, images, ids, mask)
  chex.assert_shape(got.tokens, (B, k, N))
  np.testing.assert_array_equal(got.tokens, want_tokens)
  np.testing.assert_allclose(got.scores, want_scores, atol=1e-5)
  assert (np.asarray(got.lengths) < N).any()                 # some beam ended at EOS


# --- config -------------------------------------------------------------------------------

def _config(**decoder):
  return ml_collections.ConfigDict(dict(
      data=dict(image_size=8, max_len=8),
      model=dict(image=dict(variant="mu", patch=4),
                 text=dict(variant="mu", causal=True, head="lm", pool="eos", vocab_size=V),
                 decoder=dict(dict(cross_attention=False, prefix_lm=True, tie_embed=True,
                                   image_prefix=True), **decoder)),
      objectives=dict(caption=1.0)))


def test_build_model_counts_the_image_tokens_and_rejects_what_does_not_fit():
  model = build_model(_config())
  assert model.text_tower.image_prefix == 5 and not model.text_tower.cross
  assert model.text_tower.reads_images and model.prefix_lm
  assert has_decoder(model)          # what export and serve's /v1/caption look for
  # The recipes' switch: 32x32 images in 4x4 patches, and [CLS].
  for name in ("caption_shapes:tiny,image_prefix", "vqa_gen_shapes:tiny,image_prefix"):
    tower = build_model(mmjax.load_config(name), vocab_size=V).text_tower
    assert (tower.image_prefix, tower.cross) == (65, False), name
  config = _config(cross_attention=True)
  with pytest.raises(ValueError, match="image_prefix .* instead of cross_attention"):
    build_model(config)
  config = _config()
  with config.unlocked():
    del config.model.image
  with pytest.raises(ValueError, match="image_prefix needs model.image"):
    build_model(config)
  config = _config()
  config.model.text.causal = False
  with pytest.raises(ValueError, match="image_prefix needs a causal text tower"):
    build_model(config)


def test_decode_names_a_missing_image():
  model, variables = tiny(prefix_lm=False)
  batch = inputs()
  with pytest.raises(ValueError, match="starts from images"):
    decode(model, variables, batch["text"], batch["text_mask"], max_new_tokens=2, eos_id=3,
           pad_id=0)
  tokens = jnp.zeros((B, M + 1, 16))
  with pytest.raises(ValueError, match="6 image tokens"):
    model.apply(variables, batch["text"], batch["text_mask"], image_tokens=tokens,
                method="decode_text")


# --- end to end: train, generate, export ------------------------------------------------

@pytest.mark.slow
def test_vqa_gen_with_an_image_prefix_trains_answers_and_exports(tmp_path):
  wd = tmp_path / "vqa"
  got = cli("train", "--config", "configs/vqa_gen_shapes.py:tiny,image_prefix", "--workdir",
            str(wd), "--config.total_steps=6", "--config.log_every=3",
            "--config.data.train_size=96", "--config.data.eval_size=16",
            "--config.eval_batch_size=16")
  assert got.returncode == 0, got.stderr[-2000:]
  assert 0 <= json.loads(got.stdout.strip().splitlines()[-1])["vqa_acc"] <= 1
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").open()]
  losses = [r["caption_loss"] for r in rows if r["kind"] == "train"]
  assert len(losses) == 2 and all(np.isfinite(losses))
  config = json.loads((wd / "config.json").read_text())
  assert config["model"]["decoder"]["image_prefix"] is True
  assert not config["model"]["decoder"]["cross_attention"]

  picture = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  Image.fromarray(picture).save(tmp_path / "a.png")
  question = "what colour is the circle?"
  answers = mmjax.generate(wd, images=[tmp_path / "a.png", picture], prompts=question,
                           max_tokens=3)
  assert answers[0]["generated"] == answers[1]["generated"]      # a path reads as pixels
  r = cli("generate", "--workdir", str(wd), "--image", str(tmp_path / "a.png"), "--image",
          str(tmp_path / "a.png"), "--prompt", question, "--max-tokens", "3")
  assert r.returncode == 0, r.stderr
  lines = [json.loads(line) for line in r.stdout.splitlines()]
  assert [(x["prompt"], x["generated"]) for x in lines] == [(question, a["generated"])
                                                           for a in answers]
  r = cli("generate", "--workdir", str(wd), "--text", "a red")
  assert r.returncode == 2 and "reads images (an image prefix)" in r.stderr, r.stderr

  # Exported greedy decoding (from BOS alone) is the live model's.
  out = tmp_path / "export"
  r = cli("export", "--workdir", str(wd), "--out", str(out), "--what", "caption")
  assert r.returncode == 0, r.stderr
  exported = mmjax.load_exported(out)
  loaded = mmjax.load(wd)
  tok = loaded.tokenizer
  bos = np.full((1, 1), tok.bos_id, np.int32)
  live = decode(loaded.model(), loaded.variables, bos, np.ones_like(bos),
                images=loaded.preprocess(picture)[None], eos_id=tok.eos_id, pad_id=tok.pad_id,
                max_new_tokens=exported.manifest["caption"]["max_tokens"])
  row = list(np.asarray(live.tokens[0, 0]))
  row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
  assert exported.caption([picture]) == [tok.decode(np.asarray(row, np.int32))]
