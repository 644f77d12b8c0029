"""GPT-2 through `mmjax train`: its byte-level BPE in the data pipeline (tokenizer.json or
vocab.json + merges.txt), plain-text corpora, and a converted GPT-2 fine-tuned with the
`lm` objective, then continuing a text with `mmjax generate`."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import mmjax  # noqa: E402
from conftest import cli  # noqa: E402
from mmjax.data import DataError  # noqa: E402
from mmjax.data.files import FilesSource  # noqa: E402
from mmjax.data.tokenizer import CausalTokenizer, load_tokenizer, train_wordpiece  # noqa: E402
from test_generate_cli import CORPUS, bpe_tokenizer, save_gpt2  # noqa: E402


@pytest.fixture(scope="module")
def bpe_dirs(tmp_path_factory):
  """The same BPE saved as tokenizer.json and as vocab.json + merges.txt."""
  root = tmp_path_factory.mktemp("bpe")
  hf = bpe_tokenizer()
  (root / "json").mkdir()
  (root / "files").mkdir()
  hf.save(str(root / "json" / "tokenizer.json"))
  hf.model.save(str(root / "files"))
  return root / "json", root / "files"


def test_a_gpt2_bpe_encodes_endoftext_text_endoftext_and_masks_padding(bpe_dirs):
  a, b = (load_tokenizer(d) for d in bpe_dirs)
  assert isinstance(a, CausalTokenizer) and isinstance(b, CausalTokenizer)
  eot = a.hf.token_to_id("<|endoftext|>")
  assert a.bos_id == a.eos_id == a.pad_id == eot and a.mask_id is None
  texts = ["the red circle", "a large yellow circle above a red square " * 3]
  ids, mask = a.encode(texts, 12)
  np.testing.assert_array_equal((ids, mask), b.encode(texts, 12))
  words = a.hf.encode("the red circle", add_special_tokens=False).ids
  n = len(words) + 2
  assert ids[0, :n].tolist() == [eot] + words + [eot]
  assert mask[0].tolist() == [1] * n + [0] * (12 - n)
  # A text cut short keeps no EOS: it did not end there.
  assert mask[1].all() and ids[1, 0] == eot and eot not in ids[1, 1:]
  assert a.decode(ids[0]) == "the red circle"
  assert a.prompt_ids("the red circle") == [eot] + words
  # "<|endoftext|>" written in a text is the token, from either file format.
  assert b.hf.encode("x<|endoftext|>", add_special_tokens=False).ids[-1] == eot


def test_the_bpe_files_tokenize_as_transformers_gpt2_tokenizer(bpe_dirs):
  transformers = pytest.importorskip("transformers")
  _, files = bpe_dirs
  ref = transformers.GPT2TokenizerFast.from_pretrained(str(files))
  ours = load_tokenizer(files)
  for text in CORPUS + ["Ünïcode — and  two  spaces", " leading space"]:
    assert ours.hf.encode(text, add_special_tokens=False).ids == ref(text).input_ids, text


def test_a_bert_vocabulary_still_gives_cls_and_sep():
  tok = train_wordpiece(CORPUS, 60)
  assert not isinstance(tok, CausalTokenizer)
  assert (tok.bos_id, tok.eos_id) == (tok.cls_id, tok.sep_id)
  ids, _ = tok.encode(["the red circle"], 8)
  assert ids[0, 0] == tok.cls_id and tok.prompt_ids("the red")[0] == tok.cls_id
  assert tok.sep_id not in tok.prompt_ids("the red")


def test_a_txt_corpus_is_one_text_per_line_and_bad_lines_are_skipped(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_bytes(b"first document\n\n  second one  \nbad \xff byte\nlast")
  src = FilesSource(path, image_key="image", text_key="caption")   # image_key is ignored
  assert src.texts() == ["first document", "second one", "last"]
  assert [line for _, line, _ in src.skipped_rows] == [4]
  assert "image" not in src[0]
  path.write_text("\n\n")
  with pytest.raises(DataError, match="no valid rows"):
    FilesSource(path)


def test_init_towers_from_a_gpt2_dir_with_bpe_files_take_its_tokenizer(tmp_path):
  save_gpt2(tmp_path / "gpt2", bpe_files=True)
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n".join(CORPUS))
  config = mmjax.load_config(f"lm_text:{corpus},tiny", [f"--config.init.path={tmp_path / 'gpt2'}"])
  from mmjax.tuning.init import towers_from_init
  out = towers_from_init(config)
  assert out.data.tokenizer == str(tmp_path / "gpt2")
  assert out.model.text.causal and out.model.text.head == "lm" and out.model.text.max_len == 32
  assert isinstance(load_tokenizer(out.data.tokenizer), CausalTokenizer)


@pytest.mark.slow
def test_a_converted_gpt2_finetunes_on_a_text_file_and_then_generates(tmp_path):
  from mmjax import cli as mmjax_cli
  save_gpt2(tmp_path / "hf", scale=1.0)
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(CORPUS * 4) + "\n")
  # convert takes no --no-progress, which cli() adds
  assert mmjax_cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--to",
                         str(tmp_path / "gpt2")]) == 0
  r = cli("finetune", "--config", f"configs/lm_text.py:{corpus},tiny", "--init",
          str(tmp_path / "gpt2"), "--workdir", str(tmp_path / "lm"))
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "lm" / "metrics.jsonl").open()]
  losses = [row["lm_loss"] for row in rows if row.get("kind") == "train" and "lm_loss" in row]
  assert len(losses) >= 4 and losses[-1] < 0.7 * losses[0], losses
  # The fine-tuned workdir generates, and not what the converted GPT-2 did.
  args = ("--text", "the red", "--text", "a small", "--max-tokens", "6")
  tuned = cli("generate", "--workdir", str(tmp_path / "lm"), *args)
  base = cli("generate", "--workdir", str(tmp_path / "gpt2"), *args)
  assert tuned.returncode == 0 and base.returncode == 0, tuned.stderr + base.stderr
  out = [json.loads(line) for line in tuned.stdout.splitlines()]
  assert [o["text"] for o in out] == ["the red", "a small"]
  assert all(o["generated"][0] for o in out)
  assert tuned.stdout != base.stdout
