"""`mmjax.generate` and `mmjax generate`: a GPT-2 Hugging Face directory (tiny, random,
with its own byte-level BPE) continues texts as transformers does; bad input is one
line and exit code 2."""
import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import mmjax  # noqa: E402
from conftest import cli  # noqa: E402

CORPUS = ["the red circle is left of the blue square", "a small green triangle",
          "a large yellow circle above a red square", "two blue squares and a circle",
          "hello world, this is a tiny corpus"]
N_POSITIONS = 32


def bpe_tokenizer(vocab_size: int = 300):
  """A GPT-2-style byte-level BPE (<|endoftext|> its one special token, id 0)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  hf = Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return hf


def save_gpt2(directory: pathlib.Path, *, scale: float = 12.0, bpe_files: bool = False):
  """A random GPT-2 (2 layers, 32 wide, a 32-token context) with weights spread by
  `scale` (no near-ties in greedy decoding), saved with its tokenizer -> the HF model."""
  import torch
  import transformers
  tok = bpe_tokenizer()
  eos = tok.token_to_id("<|endoftext|>")
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=N_POSITIONS,
                                n_embd=32, n_layer=2, n_head=4, bos_token_id=eos,
                                eos_token_id=eos, pad_token_id=eos)
  hf = transformers.GPT2LMHeadModel(cfg)
  with torch.no_grad():
    for w in hf.parameters():
      if w.ndim >= 2:
        w.mul_(scale)
  hf = hf.eval()
  hf.save_pretrained(directory)
  if bpe_files:
    tok.model.save(str(directory))          # vocab.json + merges.txt, as GPT-2's own
  else:
    tok.save(str(directory / "tokenizer.json"))
  return hf, tok


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  directory = tmp_path_factory.mktemp("gpt2")
  hf, tok = save_gpt2(directory)
  return directory, hf, tok


def lines(out: str) -> list[dict]:
  return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_mmjax_generate_is_the_function_and_the_subpackage_still_imports():
  import mmjax.generate.decode  # noqa: F401  (binds the subpackage; the function stays)
  from mmjax.generate import decode, run
  assert mmjax.generate is run.generate and callable(mmjax.generate)
  assert decode.__module__ == "mmjax.generate.decode"


def test_the_method_follows_from_the_settings_given():
  from mmjax.generate.run import settings
  assert settings().method == "greedy" and settings().max_tokens is None
  assert (settings(beams=3).method, settings(beams=3).beams) == ("beam", 3)
  s = settings(top_p=0.9, num_samples=2)
  assert (s.method, s.temperature, s.top_k, s.top_p, s.num_samples) == ("sample", 1.0, 0, 0.9, 2)
  with pytest.raises(ValueError, match="temperature: sampling settings"):
    settings(beams=2, temperature=0.5)
  with pytest.raises(ValueError, match="greedy decoding gives one text"):
    settings(num_samples=2)


def test_greedy_continuations_are_transformers_greedy(gpt2):
  import torch
  directory, hf, tok = gpt2
  texts = ["the red circle", "a small green triangle is"]
  got = mmjax.generate(directory, prompts=texts, max_tokens=8)
  assert [r["text"] for r in got] == texts
  for text, r in zip(texts, got):
    ids = [0] + tok.encode(text).ids                  # <|endoftext|> text, as in training
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                      max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=0)
    new = out[0, len(ids):].tolist()
    new = new[:new.index(0)] if 0 in new else new
    assert r["generated"] == [tok.decode(new)]
    assert len(r["scores"]) == 1 and r["scores"][0] < 0


def test_the_cli_prints_a_json_line_per_text_for_each_method(gpt2):
  directory, _, _ = gpt2
  greedy = cli("generate", "--workdir", str(directory), "--text", "the red", "--text",
               "two blue", "--max-tokens", "6")
  assert greedy.returncode == 0, greedy.stderr
  out = lines(greedy.stdout)
  assert [r["text"] for r in out] == ["the red", "two blue"]
  want = mmjax.generate(directory, prompts=["the red", "two blue"], max_tokens=6)
  assert [r["generated"] for r in out] == [r["generated"] for r in want]
  beams = lines(cli("generate", "--workdir", str(directory), "--text", "the red", "--beams",
                    "3", "--num-samples", "2", "--max-tokens", "6").stdout)
  assert len(beams) == 1 and len(beams[0]["generated"]) == 2
  assert beams[0]["scores"][0] >= beams[0]["scores"][1]
  sample = ["generate", "--workdir", str(directory), "--text", "the red", "--temperature",
            "2.0", "--top-k", "50", "--top-p", "0.95", "--num-samples", "3", "--max-tokens", "6"]
  a, b = lines(cli(*sample).stdout), lines(cli(*sample).stdout)
  c = lines(cli(*sample, "--seed", "1").stdout)
  assert len(a[0]["generated"]) == 3 and a == b and a != c


def test_a_gpt2_directory_with_vocab_json_and_merges_txt_generates(tmp_path):
  save_gpt2(tmp_path, bpe_files=True)
  assert not (tmp_path / "tokenizer.json").exists()
  got = mmjax.generate(tmp_path, prompts="a small", max_tokens=4)
  assert got[0]["text"] == "a small" and isinstance(got[0]["generated"][0], str)


@pytest.fixture(scope="module")
def encoder_workdir(tmp_path_factory):
  """A converted BERT: an mmjax workdir whose model encodes text but has no decoder."""
  import torch
  import transformers
  from mmjax.data.tokenizer import train_wordpiece
  root = tmp_path_factory.mktemp("bert")
  tok = train_wordpiece(CORPUS, 60)
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=32)
  transformers.BertModel(cfg).save_pretrained(root / "hf")
  tok.save(root / "hf")
  from mmjax import cli as mmjax_cli   # convert takes no --no-progress, which cli() adds
  assert mmjax_cli.main(["convert", "--from-hf", str(root / "hf"), "--to", str(root / "wd")]) == 0
  return root / "wd"


def test_bad_input_is_one_line_and_exit_code_2(gpt2, encoder_workdir, tmp_path):
  directory, _, _ = gpt2
  not_image = tmp_path / "notes.png"
  not_image.write_text("not an image")
  base = ["generate", "--workdir", str(directory)]
  cases = [
      (base + ["--image", str(not_image)], "notes.png' is not a readable image"),
      (base + ["--text", "  "], "prompt 0 is empty"),
      (base + ["--text", "the red circle " * 12], "prompt 0 is"),
      (base + ["--text", "the red", "--max-tokens", "40"], "max_tokens=40"),
      (base + ["--text", "the red", "--beams", "0"], "beams=0"),
      (base + ["--text", "the red", "--top-p", "1.5"], "top_p=1.5"),
      (base + ["--text", "the red", "--temperature", "0"], "temperature=0"),
      (base + ["--text", "the red", "--beams", "2", "--num-samples", "3"], "num_samples=3"),
      (["generate", "--workdir", str(encoder_workdir), "--text", "the red"], "no text decoder"),
      (["generate", "--workdir", str(tmp_path / "missing"), "--text", "a"], "does not exist"),
  ]
  before = sorted(p.name for p in tmp_path.iterdir())
  for args, message in cases:
    r = cli(*args)
    assert r.returncode == 2, (args, r.stderr)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("mmjax generate: error: "), (args, r.stderr)
    assert message in err[0], (message, err[0])
    assert r.stdout == "", args
  assert sorted(p.name for p in tmp_path.iterdir()) == before   # nothing written


# --- image-conditioned models: a captioner and a VQA prefix-LM --------------------------

def step0_workdir(directory, config_name: str):
  """The config's model at its random init, written as a step-0 workdir (as `mmjax
  convert` writes one): what generation reads, without paying for training."""
  import jax
  from mmjax.data import get_tokenizer
  from mmjax.io.loading import special_ids
  from mmjax.io.workdir import write_workdir
  from mmjax.models import build_model
  from mmjax.train.state import initial_state
  config = mmjax.load_config(config_name)
  tok = get_tokenizer(config.data)
  model = build_model(config, tok.vocab_size, special_ids(tok))
  s = config.data.image_size
  batch = {"image": np.zeros((1, s, s, 3), np.float32), "text": np.zeros((1, 4), np.int32),
           "text_mask": np.ones((1, 4), np.int32), "prefix_len": np.ones((1,), np.int32)}
  params = model.init({"params": jax.random.key(0)}, batch)["params"]
  return write_workdir(directory, config, initial_state(config, params), {}, tok)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  from PIL import Image
  root = tmp_path_factory.mktemp("images")
  r = np.random.default_rng(0)
  arrays = [r.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
  Image.fromarray(arrays[0]).save(root / "a.png")
  (root / "notes.png").write_text("not an image")
  return root, arrays


def test_a_captioner_captions_paths_pil_images_and_arrays_alike(tmp_path, images):
  from PIL import Image
  root, arrays = images
  wd = step0_workdir(tmp_path / "cap", "caption_shapes:tiny")
  got = mmjax.generate(wd, images=[root / "a.png", Image.fromarray(arrays[1]), arrays[2]],
                       max_tokens=5)
  assert [r["image"] for r in got] == [str(root / "a.png"), 1, 2]
  assert all(len(r["generated"]) == 1 and isinstance(r["generated"][0], str) for r in got)
  same = mmjax.generate(wd, images=[arrays[0]], max_tokens=5)
  assert same[0]["generated"] == got[0]["generated"]      # a path reads as its pixels
  r = cli("generate", "--workdir", str(wd), "--image", str(root / "a.png"), "--image",
          str(root / "a.png"), "--beams", "2", "--num-samples", "2", "--max-tokens", "5")
  assert r.returncode == 0, r.stderr
  out = lines(r.stdout)
  assert len(out) == 2 and out[0] == out[1] and len(out[0]["generated"]) == 2
  for args, message in ((["--image", str(root / "notes.png")], "is not a readable image"),
                        (["--text", "a red"], "reads images"),
                        (["--image", str(root / "a.png"), "--prompt", ""], "prompt 0 is empty")):
    r = cli("generate", "--workdir", str(wd), *args)
    assert r.returncode == 2 and message in r.stderr and r.stdout == "", (args, r.stderr)


def test_a_vqa_prefix_lm_answers_the_prompt_and_needs_one(tmp_path, images):
  root, _ = images
  wd = step0_workdir(tmp_path / "vqa", "vqa_gen_shapes:tiny")
  got = mmjax.generate(wd, images=[root / "a.png"] * 2,
                       prompts=["what colour is the circle?", "what shape is it?"], max_tokens=3)
  assert [r["prompt"] for r in got] == ["what colour is the circle?", "what shape is it?"]
  r = cli("generate", "--workdir", str(wd), "--image", str(root / "a.png"))
  assert r.returncode == 2 and "give it as the prompt" in r.stderr, r.stderr
