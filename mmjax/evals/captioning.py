"""Generation evaluators: captions (exact match, BLEU, CIDEr-D, attribute accuracy) and
VQA by generation (answer exact match), from greedy decoding on held-out images.

Texts are compared after `normalize` (lower case, punctuation split off as its own
token), so "circle," and "circle ," are the same caption. On several processes each
decodes its share of the split, and every process scores all of it (`_generated`).
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import re
from typing import Sequence

import jax
import numpy as np
import sacrebleu

from mmjax import parallel
from mmjax.data.shapes import COLORS, SHAPES, SIZES
from mmjax.evals.context import EvalContext
from mmjax.evals.embed import gather_rows, to_host
from mmjax.generate.decode import decode

log = logging.getLogger("mmjax")

CIDER_N = 4            # n-grams of 1..4 words
CIDER_SIGMA = 6.0      # CIDEr-D's Gaussian length penalty
CIDER_SCALE = 10.0
# The `shapes` labels that attribute accuracy reads (caption_metrics' `labels`).
ATTRIBUTE_KEYS = ("color", "shape", "size", "num_objects")


def normalize(text: str) -> str:
  return " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))


def _ngrams(words: Sequence[str], n: int) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """CIDEr-D (Vedantam et al. 2015, as coco-caption's CiderD computes it) of one
  candidate per image against that image's references, averaged over images.

  Per n (1..4): TF-IDF vectors of n-gram counts, IDF = log(images / images whose
  references hold the n-gram); the candidate's counts clipped to the reference's;
  cosine similarity damped by exp(-(len_c - len_r)^2 / (2 sigma^2)). The mean over n,
  averaged over references, times 10.
  """
  if len(candidates) != len(references):
    raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
  cands = [normalize(c).split() for c in candidates]
  refs = [[normalize(r).split() for r in rs] for rs in references]
  doc_freq = collections.Counter()
  for rs in refs:
    doc_freq.update(set(itertools.chain.from_iterable(
        _ngrams(r, n) for r in rs for n in range(1, CIDER_N + 1))))
  log_images = math.log(float(len(refs)))

  def vectors(words):
    vecs = [{g: c * (log_images - math.log(max(1.0, doc_freq[g])))
             for g, c in _ngrams(words, n).items()} for n in range(1, CIDER_N + 1)]
    return vecs, [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]

  scores = []
  for cand, rs in zip(cands, refs):
    c_vecs, c_norms = vectors(cand)
    per_ref = []
    for ref in rs:
      r_vecs, r_norms = vectors(ref)
      damp = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * CIDER_SIGMA ** 2))
      sims = []
      for cv, rv, cn, rn in zip(c_vecs, r_vecs, c_norms, r_norms):
        dot = sum(min(v, rv.get(g, 0.0)) * rv.get(g, 0.0) for g, v in cv.items())
        sims.append(dot / (cn * rn) * damp if cn and rn else 0.0)
      per_ref.append(np.mean(sims))
    scores.append(CIDER_SCALE * float(np.mean(per_ref)))
  return float(np.mean(scores))


def bleu(candidates: Sequence[str], references: Sequence[str]) -> float:
  """sacrebleu's corpus BLEU (0..100) with one reference per candidate, on normalised text."""
  return float(sacrebleu.corpus_bleu([normalize(c) for c in candidates],
                                     [[normalize(r) for r in references]],
                                     tokenize="none").score)


def attributes(caption: str) -> dict[str, int]:
  """The first colour, shape and size word of a caption as `shapes` label ids (-1: none)."""
  words = normalize(caption).split()
  first = lambda names: next((names.index(w) for w in words if w in names), -1)
  return {"color": first(COLORS), "shape": first(SHAPES), "size": first(SIZES)}


def caption_metrics(generated: Sequence[str], references: Sequence[str],
                    labels: dict[str, np.ndarray] | None = None) -> dict[str, float]:
  """exact, bleu, cider over all images; with `labels` (shapes' color, shape, size,
  num_objects [N]): exact_single and attr_<name> / attr_all on the single-object images,
  whose caption names exactly one colour, shape and size."""
  same = np.array([normalize(g) == normalize(r) for g, r in zip(generated, references)])
  out = {"exact": float(same.mean()), "bleu": bleu(generated, references),
         "cider": cider_d(generated, [[r] for r in references])}
  if labels is not None:
    single = np.asarray(labels["num_objects"]) == 1
    if single.any():
      got = [attributes(g) for g, s in zip(generated, single) if s]
      right = {k: np.array([a[k] for a in got]) == np.asarray(labels[k])[single]
               for k in ("color", "shape", "size")}
      out["exact_single"] = float(same[single].mean())
      out.update({f"attr_{k}": float(v.mean()) for k, v in right.items()})
      out["attr_all"] = float(np.logical_and.reduce(list(right.values())).mean())
  return out


def _generated(ctx: EvalContext, ev, prompt, fields: Sequence[str]
               ) -> tuple[list[str], dict[str, np.ndarray]]:
  """Greedy continuations of `prompt(batch)` (host prompt ids and mask [B, P]) for the
  first ev.examples (0: all) examples of ev.split, and those examples' `fields` (batch
  keys, those the batches hold), in split order and the same on every process.

  Each process decodes its own rows of each global batch. The tokens (global arrays) and
  the host fields are gathered to every process with each row's position in the split
  and put in that order, so the result does not depend on the number of processes.
  """
  tok, mesh = ctx.tokenizer, ctx.embedder.mesh
  limit = ev.get("examples", 0)
  tokens, token_pos, local = [], [], collections.defaultdict(list)
  for b, batch in enumerate(ctx.batches(ev)):
    ids, mask = prompt(batch)
    pos = ctx.positions(b, len(ids))
    g = parallel.device_batch({"image": batch["image"], "ids": ids, "mask": mask,
                               "position": pos}, mesh)
    n = ev.get("max_new_tokens", 0) or ctx.embedder.model.text_tower.max_len - ids.shape[1]
    got = decode(ctx.embedder.model, ctx.embedder.variables, g["ids"], g["mask"],
                 images=g["image"], max_new_tokens=n, eos_id=tok.sep_id, pad_id=tok.pad_id,
                 method="greedy")
    tokens.append(to_host(got.tokens[:, 0]))       # [G, T], G = rows x processes
    token_pos.append(to_host(g["position"]))
    for k in ("valid", *fields):
      if k in batch:          # the same keys on every process: one pipeline
        local[k].append(np.asarray(batch[k]))
    local["position"].append(pos)
    if limit and (b + 1) * len(ids) * jax.process_count() >= limit:
      break                                        # the same batch on every process
  tokens = np.concatenate(tokens)[np.argsort(np.concatenate(token_pos))]
  cols = gather_rows({k: np.concatenate(v) for k, v in local.items()})
  cols = {k: v[np.argsort(cols["position"])] for k, v in cols.items()}
  keep = cols.pop("valid") > 0        # row i is position i: the global batches tile the split
  if limit:
    keep &= np.arange(len(keep)) < limit
  cols.pop("position")
  return tok.decode(tokens[keep]), {k: v[keep] for k, v in cols.items()}


def _write(ctx: EvalContext, rows: list[dict]) -> None:
  """<workdir>/reports/<name>_generated.jsonl, one line per example, by process 0 only."""
  if ctx.workdir is None or jax.process_index() != 0:
    return
  path = ctx.workdir / "reports" / f"{ctx.name or 'captioning'}_generated.jsonl"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def evaluate(ctx: EvalContext, ev) -> dict[str, float]:
  """Greedy captions of ev.split's images from [CLS] against their `caption`; each
  caption and its reference go to <workdir>/reports/<name>_generated.jsonl."""
  cls = ctx.tokenizer.cls_id
  prompt = lambda b: (np.full((len(b["image"]), 1), cls, np.int32),
                      np.ones((len(b["image"]), 1), np.int32))
  generated, cols = _generated(ctx, ev, prompt, ("caption", *ATTRIBUTE_KEYS))
  refs = [str(r) for r in cols["caption"]]
  has_attributes = all(k in cols for k in ATTRIBUTE_KEYS)
  out = caption_metrics(generated, refs, cols if has_attributes else None)
  _write(ctx, [{"generated": g, "reference": r} for g, r in zip(generated, refs)])
  if jax.process_index() == 0:
    for g, r in list(zip(generated, refs))[:3]:
      log.info("%s: %r (reference %r)", ctx.name or "captioning", g, r)
  return out


def evaluate_vqa(ctx: EvalContext, ev) -> dict[str, float]:
  """Answers generated after each question (data.prefix_field, the decoder's prefix) of
  ev.split: exact-match accuracy against data.text_field (the answer); each question,
  generated and true answer go to <workdir>/reports/<name>_generated.jsonl."""
  data = ctx.data_config(ev)
  if not data.get("prefix_field"):
    raise ValueError(f"evals.{ctx.name or 'vqa_gen'}: vqa_gen needs data.prefix_field "
                     "(the question)")
  prompt = lambda b: ctx.tokenizer.encode(list(b[data.prefix_field]), data.max_len)
  generated, cols = _generated(ctx, ev, prompt, [data.prefix_field, data.text_field])
  answers = [str(a) for a in cols[data.text_field]]
  _write(ctx, [{"question": str(q), "generated": g, "answer": a}
               for q, g, a in zip(cols[data.prefix_field], generated, answers)])
  return {"acc": float(np.mean([normalize(g) == normalize(a)
                                for g, a in zip(generated, answers)]))}
