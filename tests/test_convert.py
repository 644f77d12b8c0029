"""Hugging Face <-> mmjax: numerical parity, round trips, strict key checks, the CLI.

Random-weight HF models are built from tiny configs with torch (CPU) and saved to
temporary directories; nothing is downloaded (HF_HUB_OFFLINE=1).
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mmjax  # noqa: E402
from mmjax import cli  # noqa: E402
from mmjax.io import KeyMismatch  # noqa: E402
from mmjax.io import hf as pretrained  # noqa: E402
from mmjax.data.tokenizer import train_wordpiece  # noqa: E402
from mmjax.models.vit import resample_posemb  # noqa: E402

V, L, S = 60, 12, 16           # vocab, text length, image size
ATOL = 1e-4                    # the parity bar of the issue (float32)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def hf_model(kind: str, act: str = "gelu"):
  torch.manual_seed(0)
  t = transformers
  if kind == "clip":
    text = dict(SMALL, vocab_size=V, max_position_embeddings=L, hidden_act=act,
                bos_token_id=V - 2, eos_token_id=V - 1, pad_token_id=V - 1)
    vision = dict(SMALL, image_size=S, patch_size=4, hidden_act=act)
    return t.CLIPModel(t.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
  if kind in ("vit", "vit_cls"):
    cfg = t.ViTConfig(**SMALL, image_size=S, patch_size=4, num_labels=5)
    return t.ViTForImageClassification(cfg) if kind == "vit_cls" else t.ViTModel(cfg)
  if kind in ("bert", "bert_mlm"):
    cfg = t.BertConfig(**SMALL, vocab_size=V, max_position_embeddings=L + 4)
    return t.BertForMaskedLM(cfg) if kind == "bert_mlm" else t.BertModel(cfg)
  cfg = t.GPT2Config(vocab_size=V, n_positions=L + 4, n_embd=32, n_layer=2, n_head=4)
  return t.GPT2LMHeadModel(cfg)


def _randomize(model):
  """Random LayerNorm affine params and biases, so that parity covers their layouts, and
  weights 5x the init scale, so that outputs are O(1) and a 1e-4 bar means something."""
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        p.mul_(5.0)
      if name.endswith("bias") or "norm" in name.lower() or "ln_" in name:
        p.add_(0.1 * torch.randn(p.shape, generator=g))
      if name.endswith("logit_scale"):
        p.fill_(2.0)
  return model.eval()


def save(kind, tmp_path, act="gelu", tokenizer=False):
  model = _randomize(hf_model(kind, act))
  path = tmp_path / f"hf_{kind}_{act}"
  model.save_pretrained(path)
  if tokenizer:
    tok = train_wordpiece(["a b c d", "b c a", "d a"], V)
    tok.save(path)
  return model, path


def text_batch(bos=None, eos=None, vocab=V):
  """ids [3, L] with lengths 12, 7, 3 (right padding), and their 0/1 mask."""
  r = np.random.default_rng(0)
  lengths = np.array([L, 7, 3])
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  ids = r.integers(0, vocab - 2, (3, L)).astype(np.int32)
  if bos is not None:
    ids[:, 0] = bos
  if eos is not None:   # CLIP pools at the end-of-text token
    ids[np.arange(3), lengths - 1] = eos
  return np.where(mask == 1, ids, 0 if eos is None else eos), mask


def images(n=2, size=S):
  return np.random.default_rng(1).normal(size=(n, size, size, 3)).astype(np.float32)


def torch_images(x):
  return torch.tensor(x.transpose(0, 3, 1, 2))


def max_diff(a, b, mask=None):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if mask is not None:     # compare real tokens only: padded positions are undefined
    a, b = a[mask.astype(bool)], b[mask.astype(bool)]
  assert np.abs(b).max() > 0.2, "reference outputs too small for an absolute bar"
  return float(np.abs(a - b).max())


def assert_round_trip(p, path, tmp_path, hf_module):
  """mmjax -> HF gives back the original tensors, and transformers loads the export."""
  out = mmjax.save_pretrained(tmp_path / "export", p.config, p.params, hf_config_base=p.hf_config)
  original, exported = load_file(str(path / "model.safetensors")), load_file(
      str(out / "model.safetensors"))
  assert sorted(exported) == sorted(original)
  for k in original:
    assert exported[k].shape == original[k].shape and exported[k].dtype == original[k].dtype, k
    np.testing.assert_array_equal(exported[k], original[k], err_msg=k)
  reloaded = type(hf_module).from_pretrained(out).eval()
  for (k, a), b in zip(hf_module.state_dict().items(), reloaded.state_dict().values()):
    assert torch.equal(a, b), k


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_parity_and_round_trip(tmp_path, act):
  hf, path = save("clip", tmp_path, act)
  p = mmjax.from_pretrained(path)
  assert p.architecture == "CLIPModel"
  assert p.config.model.image.act == p.config.model.text.act == act
  assert p.config.model.text.ln_eps == 1e-5 and p.config.model.embed_dim == 24
  ids, mask = text_batch(bos=V - 2, eos=V - 1)
  x = images()
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask),
             pixel_values=torch_images(x))
    # CLIPModel's outputs carry projected pooler outputs; the towers' own come from here.
    ref_img = hf.vision_model(pixel_values=torch_images(x))
    ref_txt = hf.text_model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask))
  apply = lambda *a, **k: p.model.apply({"params": p.params}, *a, **k)
  out = apply({"image": x, "text": ids, "text_mask": mask})
  _, img = apply(x, method="encode_image")
  _, txt = apply(ids, mask, method="encode_text")
  sim = out["logit_scale"] * out["image_emb"] @ out["text_emb"].T
  diffs = {
      "image_embeds": max_diff(out["image_emb"], ref.image_embeds),
      "text_embeds": max_diff(out["text_emb"], ref.text_embeds),
      "logits_per_image": max_diff(sim, ref.logits_per_image),
      "vision_pooled": max_diff(img["pooled"], ref_img.pooler_output),
      # The un-normalised residual stream reaches |x| ~ 70 here, where a float32 ulp is
      # ~8e-6: compare it relative to its scale.
      "vision_tokens_rel": max_diff(img["tokens"], ref_img.last_hidden_state)
                           / float(np.abs(ref_img.last_hidden_state.numpy()).max()),
      "text_pooled": max_diff(txt["pooled"], ref_txt.pooler_output),
      "text_tokens": max_diff(txt["tokens"], ref_txt.last_hidden_state, mask),
  }
  print(f"clip/{act}", diffs)
  assert max(diffs.values()) <= ATOL, diffs
  assert_round_trip(p, path, tmp_path, hf)


@pytest.mark.parametrize("kind", ["vit_cls", "vit"])
def test_vit_parity_and_round_trip(tmp_path, kind):
  hf, path = save(kind, tmp_path)
  p = mmjax.from_pretrained(path)
  x = images()
  with torch.no_grad():
    ref = hf(pixel_values=torch_images(x))
  _, out = p.model.apply({"params": p.params}, x, method="encode_image")
  if kind == "vit_cls":
    assert p.config.model.image.num_classes == 5
    diffs = {"logits": max_diff(out["logits"], ref.logits)}
  else:
    assert p.config.model.image.pooler
    diffs = {"pooled": max_diff(out["pooled"], ref.pooler_output),
             "tokens": max_diff(out["tokens"], ref.last_hidden_state)}
  print(kind, diffs)
  assert max(diffs.values()) <= ATOL, diffs
  assert_round_trip(p, path, tmp_path, hf)


@pytest.mark.parametrize("kind", ["bert_mlm", "bert"])
def test_bert_parity_with_padding_and_round_trip(tmp_path, kind):
  hf, path = save(kind, tmp_path)
  p = mmjax.from_pretrained(path)
  ids, mask = text_batch(bos=1)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask))
  _, out = p.model.apply({"params": p.params}, ids, mask, method="encode_text")
  if kind == "bert_mlm":
    diffs = {"mlm_logits": max_diff(out["logits"], ref.logits, mask)}
  else:
    diffs = {"tokens": max_diff(out["tokens"], ref.last_hidden_state, mask),
             "pooled": max_diff(out["pooled"], ref.pooler_output)}
  print(kind, diffs)
  assert max(diffs.values()) <= ATOL, diffs
  # The padded rows agree with the same texts run unpadded.
  _, short = p.model.apply({"params": p.params}, ids[2:, :3], mask[2:, :3], method="encode_text")
  assert max_diff(short["tokens"], out["tokens"][2:, :3]) <= 1e-5
  assert_round_trip(p, path, tmp_path, hf)


def test_gpt2_logits_parity_and_round_trip(tmp_path):
  hf, path = save("gpt2", tmp_path)
  p = mmjax.from_pretrained(path)
  assert p.config.model.text.act == "gelu_tanh" and p.config.model.text.causal
  ids, mask = text_batch()
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask))
  _, out = p.model.apply({"params": p.params}, ids, mask, method="encode_text")
  diffs = {"logits": max_diff(out["logits"], ref.logits, mask)}
  print("gpt2", diffs)
  assert diffs["logits"] <= ATOL, diffs
  assert_round_trip(p, path, tmp_path, hf)


def test_mismatched_model_lists_missing_unexpected_and_misshaped_keys(tmp_path):
  _, path = save("bert_mlm", tmp_path)
  config = mmjax.from_pretrained(path).config
  with config.unlocked():
    config.model.text.depth = 1          # the checkpoint has 2 layers: layer 1 is unexpected
    config.model.text.vocab_size = V + 4  # word embeddings are mis-shaped
    config.model.text.pooler = True      # BertForMaskedLM has no pooler: missing
  with pytest.raises(KeyMismatch) as e:
    pretrained.load_params(path, config)
  msg = str(e.value)
  assert "bert.pooler.dense.weight" in e.value.missing
  assert "bert.encoder.layer.1.attention.self.query.weight" in e.value.unexpected
  assert any(m.startswith("bert.embeddings.word_embeddings.weight (60, 32)")
             for m in e.value.misshaped), e.value.misshaped
  assert "missing" in msg and "unexpected" in msg and "mis-shaped" in msg

  # Strict by default; a new head is allowed missing only when named.
  config = mmjax.from_pretrained(path).config
  with config.unlocked():
    config.model.text.pooler = True
  with pytest.raises(KeyMismatch, match="pooler"):
    pretrained.load_params(path, config)
  params = pretrained.load_params(path, config, allow_missing=r"/pooler/")
  init = pretrained.init_params(mmjax.build_model(config), config)
  np.testing.assert_array_equal(params["text_tower"]["pooler"]["kernel"],
                                init["text_tower"]["pooler"]["kernel"])


def test_loading_at_another_resolution_resamples_posemb(tmp_path):
  _, path = save("vit_cls", tmp_path)
  base = mmjax.from_pretrained(path)
  big = mmjax.from_pretrained(path, image_size=2 * S)
  pe, pe_big = base.params["image_tower"]["posemb"], big.params["image_tower"]["posemb"]
  assert pe.shape == (1, 1 + 16, 32) and pe_big.shape == (1, 1 + 64, 32)
  np.testing.assert_array_equal(pe_big[:, :1], pe[:, :1])               # the cls position
  np.testing.assert_allclose(pe_big[:, 1:], resample_posemb(pe[:, 1:], (8, 8)), atol=1e-6)
  _, out = big.model.apply({"params": big.params}, images(size=2 * S), method="encode_image")
  assert out["tokens"].shape == (2, 65, 32) and out["logits"].shape == (2, 5)
  assert big.preprocess.output_size == (2 * S, 2 * S)


def test_cli_convert_eval_and_back(tmp_path, capsys):
  hf, path = save("clip", tmp_path, tokenizer=True)
  work, out = tmp_path / "work", tmp_path / "back"
  assert cli.main(["convert", "--from-hf", str(path), "--to", str(work)]) == 0
  assert (work / "checkpoints" / "0").is_dir() and (work / "tokenizer.json").is_file()
  assert cli.main(["eval", "--config", str(work / "config.py"), "--workdir", str(work)]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"step": 0}
  assert cli.main(["convert", "--to-hf", str(work), "--out", str(out)]) == 0
  original, exported = load_file(str(path / "model.safetensors")), load_file(
      str(out / "model.safetensors"))
  assert sorted(original) == sorted(exported)
  for k in original:
    assert exported[k].shape == original[k].shape and exported[k].dtype == original[k].dtype, k
    np.testing.assert_array_equal(exported[k], original[k], err_msg=k)
  assert json.loads((out / "config.json").read_text())["text_config"]["eos_token_id"] == V - 1
  reloaded = transformers.CLIPModel.from_pretrained(out).eval()
  ids, mask = text_batch(bos=V - 2, eos=V - 1)
  with torch.no_grad():
    a = hf.get_text_features(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask))
    b = reloaded.get_text_features(input_ids=torch.tensor(ids).long(),
                                   attention_mask=torch.tensor(mask))
  a = getattr(a, "pooler_output", a)
  b = getattr(b, "pooler_output", b)
  assert torch.equal(a, b)


def test_cli_convert_reports_a_bad_directory(tmp_path, capsys):
  assert cli.main(["convert", "--from-hf", str(tmp_path), "--to", str(tmp_path / "w")]) == 2
  assert "config.json: no such file" in capsys.readouterr().err


def test_mmjax_does_not_import_torch():
  code = ("import sys, mmjax, mmjax.io; "
          "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
  from conftest import run_python
  r = run_python(code)
  assert r.returncode == 0, r.stderr
  assert jax.__version__
