"""Fine-tuning tasks on `shapes`: word tagging (NER), VQA as classification, image-text
matching. Their data fields, token labels, head, objective, ner evaluator and tiny runs."""
import json
import math
import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from seqeval import metrics as seqeval

import mmjax
from mmjax import evals, objectives
from mmjax import data as mmdata
from mmjax.data import shapes, tokenizer as tokenizer_lib
from mmjax.data.errors import DataError
from mmjax.models import build_model
from mmjax.train.loop import setup
from mmjax.train.metrics_writer import read_metrics
from mmjax.tuning.init import load_init

from conftest import shared_run


# ---------------------------------------------------------------- data


def test_word_tags_of_the_three_caption_forms():
  assert shapes.word_tags("a small red circle") == ["O", "B-SIZE", "B-COLOR", "B-SHAPE"]
  two = "a large blue square left of a small green cross"
  assert shapes.word_tags(two) == ["O", "B-SIZE", "B-COLOR", "B-SHAPE", "B-REL", "I-REL",
                                   "O", "B-SIZE", "B-COLOR", "B-SHAPE"]
  assert shapes.word_tags("a small red circle below a large white triangle")[4] == "B-REL"
  three = "a small red circle, a large blue square and a small green cross"
  assert shapes.word_tags(three) == ["O", "B-SIZE", "B-COLOR", "B-SHAPE"] * 2 + ["O"] + [
      "O", "B-SIZE", "B-COLOR", "B-SHAPE"]
  assert set(t for c in (two, three) for t in shapes.word_tags(c)) <= set(shapes.WORD_TAGS)
  assert shapes.WORD_TAGS[0] == "O"


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.train_wordpiece(["a small red circle, a large blue square"] * 20, 60)


def test_token_labels_go_on_each_words_first_subtoken(tok):
  text = "a circlered, small"                  # "circlered," is one word of 3+ tokens
  ids, mask, labels = tok.encode_word_labels([text], [[7, 8, 9]], 12)
  ref_ids, ref_mask = tok.encode([text], 12)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)
  tokens = [tok.hf.id_to_token(int(i)) for i in ids[0, :mask[0].sum()]]
  assert tokens[:3] == ["[CLS]", "a", "circle"] and tokens[-3:] == [",", "small", "[SEP]"]
  assert len(tokens) >= 7                     # "circlered" is several word pieces
  want = [-1, 7, 8] + [-1] * (len(tokens) - 5) + [9, -1]
  assert labels[0, :len(tokens)].tolist() == want
  assert (labels[0, len(tokens):] == -1).all()
  # Truncation drops the labels of the words it cuts off.
  _, _, short = tok.encode_word_labels([text], [[7, 8, 9]], 4)
  assert short[0].tolist() == [-1, 7, 8, -1]
  with pytest.raises(DataError, match="3 words but 2 word labels"):
    tok.encode_word_labels([text], [[7, 8]], 12)


class _Tagged:
  """Two text fields and a tag field; `bad` puts a tag outside the vocabulary."""

  label_names = {"label": ["no", "yes"], "tags": ["O", "B-SIZE"]}

  def __init__(self, bad=False):
    self.bad = bad

  def __len__(self):
    return 4

  def __getitem__(self, i):
    return dict(image=np.zeros((8, 8, 3), np.uint8), caption="a small circle",
                question="what size is it", label=i % 2,
                tags="O B-SIZE " + ("B-BIG" if self.bad else "O"))


def _batch(tok, source, **data):
  cfg = ml_collections.ConfigDict(dict(name="shapes", image_size=8, max_len=8, **data))
  return mmdata.make_dataset(cfg, "test", batch_size=2, train=False, tokenizer=tok,
                             source=source, process_index=0, process_count=1)[0]


def test_text_field_and_token_labels_in_batches(tok):
  plain = _batch(tok, _Tagged())
  assert tok.decode(plain["text"][0]) == "a small circle"
  assert plain["tags"][0] == "O B-SIZE O" and plain["label"].tolist() == [0, 1]
  asked = _batch(tok, _Tagged(), text_field="question")
  np.testing.assert_array_equal(asked["text"], tok.encode(["what size is it"] * 2, 8)[0])
  tagged = _batch(tok, _Tagged(), token_labels="tags")
  assert tagged["tags"].dtype == np.int32 and tagged["tags"].shape == (2, 8)
  assert tagged["tags"][0, :5].tolist() == [-1, 0, 1, 0, -1]
  np.testing.assert_array_equal(tagged["text"], plain["text"])
  with pytest.raises(DataError, match="3 tags for the 4 words of data.text_field='question'"):
    _batch(tok, _Tagged(), text_field="question", token_labels="tags")
  with pytest.raises(DataError, match=r"text_field='prompt'.*\['caption', 'question', 'tags'\]"):
    _batch(tok, _Tagged(), text_field="prompt")
  with pytest.raises(DataError, match="token_labels='tags': tag 'B-BIG'"):
    _batch(tok, _Tagged(bad=True), token_labels="tags")
  with pytest.raises(DataError, match="token_labels='caption'.*no tag vocabulary"):
    _batch(tok, _Tagged(), token_labels="caption")


# ---------------------------------------------------------------- head, objective, evaluator

B, L, V, C = 2, 6, 30, len(shapes.WORD_TAGS)


def _tagger(**model):
  return build_model(ml_collections.ConfigDict(dict(data=dict(image_size=16, max_len=L),
                                                    model=model)))


def test_token_classifier_shape_and_validation():
  model = _tagger(text=dict(variant="mu", vocab_size=V),
                  classifier=dict(input="text_tokens", num_classes=C))
  batch = {"text": np.arange(B * L, dtype=np.int32).reshape(B, L) % V,
           "text_mask": np.ones((B, L), np.int32)}
  params = model.init(jax.random.key(0), batch)["params"]
  out = model.apply({"params": params}, batch)
  chex.assert_shape(out["token_logits"], (B, L, C))
  assert "class_logits" not in out
  np.testing.assert_allclose(model.apply({"params": params}, batch, method=model.classify),
                             out["token_logits"], atol=1e-6)
  with pytest.raises(ValueError, match="needs model.text"):
    _tagger(image=dict(variant="mu", patch=4), classifier=dict(input="text_tokens", num_classes=C))
  with pytest.raises(ValueError, match="expected one of.*'text_tokens'"):
    _tagger(text=dict(variant="mu", vocab_size=V), classifier=dict(input="tokens", num_classes=C))


def test_token_classify_counts_only_labelled_tokens_of_valid_rows():
  logits = jax.random.normal(jax.random.key(1), (3, 4, 5))
  labels = jnp.array([[-1, 2, 0, -1], [1, -1, -1, -1], [3, 3, 3, 3]])
  batch = {"tags": labels, "valid": jnp.array([1.0, 1.0, 0.0])}
  loss, m = objectives.token_classify({"token_logits": logits}, batch, label="tags")
  picked = [(0, 1), (0, 2), (1, 0)]
  per = [optax.softmax_cross_entropy_with_integer_labels(logits[r, t], labels[r, t])
         for r, t in picked]
  np.testing.assert_allclose(loss, np.mean(per), rtol=1e-6)
  acc = np.mean([int(jnp.argmax(logits[r, t]) == labels[r, t]) for r, t in picked])
  assert float(m["acc"]) == pytest.approx(acc)
  with pytest.raises(KeyError, match="data.token_labels"):
    objectives.token_classify({"token_logits": logits}, batch)


def test_ner_evaluator_matches_seqeval_on_a_wrong_span(tmp_path):
  names = list(shapes.WORD_TAGS)
  # Word level: "a small red circle left of a large blue square" and "a white cross".
  true = [["O", "B-SIZE", "B-COLOR", "B-SHAPE", "B-REL", "I-REL", "O", "B-SIZE", "B-COLOR",
           "B-SHAPE"], ["O", "B-COLOR", "B-SHAPE"]]
  pred = [["O", "B-SIZE", "B-SHAPE", "B-SHAPE", "B-REL", "O", "O", "B-SIZE", "B-COLOR",
           "B-SHAPE"], ["O", "B-COLOR", "B-SHAPE"]]       # "red" mistyped, "left of" cut short
  # Token level, padded to one length: "circle" and "cross" are two tokens each, and
  # the predictions at their second tokens (labelled -1, like [CLS]) must not count.
  labels = np.full((2, 14), -1)
  logits = np.zeros((2, 14, len(names)))
  firsts = [[1, 2, 3, 4, 6, 7, 8, 9, 10, 11], [1, 2, 3]]
  for row, positions in enumerate(firsts):
    for pos, t, p in zip(positions, true[row], pred[row]):
      labels[row, pos] = names.index(t)
      logits[row, pos, names.index(p)] = 1.0
  logits[0, 5, names.index("I-REL")] = logits[1, 4, names.index("B-REL")] = 5.0
  ctx = types.SimpleNamespace(
      name="tags", workdir=tmp_path, batches=lambda ev: [],
      classnames=lambda ev, label: names,
      embedder=types.SimpleNamespace(classify=lambda b, label: {"logits": logits, label: labels}))
  ev = ml_collections.ConfigDict(dict(type="ner", split="test", label="word_tags"))
  got = evals.ner.evaluate(ctx, ev)
  assert got["precision"] == pytest.approx(seqeval.precision_score(true, pred))
  assert got["recall"] == pytest.approx(seqeval.recall_score(true, pred))
  assert got["f1"] == pytest.approx(seqeval.f1_score(true, pred)) == pytest.approx(7 / 9)
  per_type = seqeval.classification_report(true, pred, output_dict=True)
  for t in ("SIZE", "COLOR", "SHAPE", "REL"):
    assert got[f"f1_{t}"] == pytest.approx(per_type[t]["f1-score"]), t
  assert got["f1_REL"] == 0.0 and got["word_acc"] == pytest.approx(11 / 13)
  saved = json.loads((tmp_path / "reports" / "tags.json").read_text())
  assert saved["report"]["micro avg"]["f1-score"] == pytest.approx(7 / 9)


# ---------------------------------------------------------------- tiny runs


def _finite_train_loss(workdir):
  losses = [m["loss"] for m in read_metrics(workdir) if m["kind"] == "train"]
  return bool(losses) and all(math.isfinite(x) for x in losses)


def test_ner_tiny_run_reports_entity_f1(tmp_path):
  config = mmjax.load_config("finetune_ner:tiny")
  source = mmdata.build_source(config.data, "test")
  assert source.label_names["word_tags"] == list(shapes.WORD_TAGS)
  assert all(source[i]["word_tags"] == " ".join(shapes.word_tags(source[i]["caption"]))
             for i in range(5))
  result = mmjax.train(config, tmp_path, progress=False)
  for key in ("ner_precision", "ner_recall", "ner_f1", "ner_word_acc", "ner_f1_SIZE",
              "ner_f1_COLOR", "ner_f1_SHAPE", "ner_f1_REL"):
    assert 0.0 <= result[key] <= 1.0, key
  assert _finite_train_loss(tmp_path)
  assert "micro avg" in json.loads((tmp_path / "reports" / "ner.json").read_text())["report"]


@pytest.fixture(scope="session")
def itm_workdir(tmp_path_factory):
  """finetune_itm:tiny trained from scratch; its model is demo:tiny's, so it stands in
  for a demo-pretrained workdir below."""
  return shared_run(tmp_path_factory, "itm", lambda wd: mmjax.train(
      mmjax.load_config("finetune_itm:tiny"), wd, progress=False))


def test_itm_tiny_run_reports_matching_and_retrieval(itm_workdir):
  workdir, result = itm_workdir
  assert 0.0 <= result["itm_acc"] <= 1.0 and 0.0 <= result["retrieval_i2t_r1"] <= 1.0
  assert _finite_train_loss(workdir)


def test_vqa_tiny_finetune_from_a_demo_shaped_workdir(itm_workdir, tmp_path):
  result = mmjax.finetune(mmjax.load_config("finetune_vqa:tiny"), tmp_path / "vqa",
                          init=str(itm_workdir[0]), progress=False)
  assert 0.0 <= result["vqa_acc"] <= 1.0 and "vqa_f1_yes" in result
  assert _finite_train_loss(tmp_path / "vqa")
  assert (tmp_path / "vqa" / "reports" / "vqa.json").is_file()


def test_ner_takes_only_the_text_tower_of_a_demo_shaped_workdir(itm_workdir):
  config = mmjax.load_config("finetune_ner:tiny", [f"--config.init.path={itm_workdir[0]}"])
  params = jax.device_get(setup(config).state.params)
  merged, _, info = load_init(config, params)
  text = jax.tree.leaves(params["text_tower"])
  assert (info["loaded"], info["new"]) == (len(text), 2)    # new: the classifier's kernel, bias
  assert not np.allclose(jax.tree.leaves(merged["text_tower"])[0], text[0])
