"""`generate`: text from a trained model, the one front end of Python and `mmjax generate`.

  mmjax.generate("runs/cap", images=["a.png", "b.png"], beams=4)
  mmjax.generate("runs/vqa", images=["a.png"], prompts="what colour is the circle?")
  mmjax.generate("hf/gpt2", prompts=["The meaning of life is"], temperature=0.8, top_k=40,
                 num_samples=3, seed=0)

The model is an mmjax workdir, a Hugging Face directory (GPT-2) or a `mmjax.load`
result. Each prompt becomes `BOS tokens` (the tokenizer's [CLS], or GPT-2's
<|endoftext|>), as the decoder saw texts in training; a prefix-LM's (trained with
data.prefix_field, VQA) is its whole prefix `BOS tokens EOS`. A generated text ends
before the first EOS. The decoding method follows from the settings given: `beams` ->
beam search, any of `temperature` / `top_k` / `top_p` -> sampling, none -> greedy.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
from typing import Any

import jax
import numpy as np
from PIL import Image

from mmjax import io
from mmjax.data.errors import DataError
from mmjax.data.files import DECODE_ERRORS, decode_image
from mmjax.generate.decode import decode
from mmjax.models.text import TextEncoder

DEFAULT_MAX_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class Settings:
  """Decoding as a user states it, checked before any model is loaded."""
  method: str                  # "greedy" | "sample" | "beam"
  max_tokens: int | None = None   # None: DEFAULT_MAX_TOKENS, or what the context leaves
  num_samples: int = 1         # sequences per input: samples, or the n best beams
  beams: int = 1
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  length_penalty: float = 1.0
  seed: int = 0


def settings(*, method: str | None = None, beams: int | None = None,
             temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, max_tokens: int | None = None,
             num_samples: int = 1, length_penalty: float = 1.0, seed: int = 0) -> Settings:
  """The decoding `Settings`; a ValueError naming the setting at fault."""
  sampling = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p).items()
              if v is not None}
  if method is None:
    method = "beam" if beams is not None else "sample" if sampling else "greedy"
  if method not in ("greedy", "sample", "beam"):
    raise ValueError(f"method={method!r}: expected 'greedy', 'sample' or 'beam'")
  if method != "sample" and sampling:
    raise ValueError(f"{', '.join(sampling)}: sampling settings, which {method} decoding "
                     "does not take (sample, or drop them)")
  if method != "beam" and beams is not None:
    raise ValueError(f"beams={beams} with method={method!r}: beams are for beam search")
  if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
    raise ValueError(f"max_tokens={max_tokens!r}: expected an integer >= 1")
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples={num_samples!r}: expected an integer >= 1")
  if method == "greedy" and num_samples > 1:
    raise ValueError(f"num_samples={num_samples}: greedy decoding gives one text per input; "
                     "sample (temperature, top_k, top_p) or use beams")
  s = Settings(method, max_tokens, num_samples, seed=int(seed),
               length_penalty=float(length_penalty))
  if method == "beam":
    beams = 4 if beams is None else beams
    if not isinstance(beams, int) or beams < 1:
      raise ValueError(f"beams={beams!r}: expected an integer >= 1")
    if num_samples > beams:
      raise ValueError(f"num_samples={num_samples} exceeds beams={beams}: beam search "
                       "returns at most its beams")
    return dataclasses.replace(s, beams=beams)
  if method == "sample":
    temperature = 1.0 if temperature is None else float(temperature)
    top_k, top_p = top_k or 0, 1.0 if top_p is None else float(top_p)
    if not temperature > 0:
      raise ValueError(f"temperature={temperature}: expected > 0 (greedy: leave it unset)")
    if not isinstance(top_k, int) or top_k < 0:
      raise ValueError(f"top_k={top_k!r}: expected an integer >= 0 (0: off)")
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p={top_p}: expected 0 < top_p <= 1")
    return dataclasses.replace(s, temperature=temperature, top_k=top_k, top_p=top_p)
  return s


def generate(model: str | pathlib.Path | io.Loaded, *, images=None,
             prompts: str | list[str] | None = None, method: str | None = None,
             beams: int | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None,
             max_tokens: int | None = None, num_samples: int = 1,
             length_penalty: float = 1.0, seed: int = 0, batch_size: int = 16
             ) -> list[dict[str, Any]]:
  """Generate text for each image (captions; answers with `prompts` as questions) or,
  with no images, for each prompt (a GPT-2-style language model continues it).

  model: an mmjax workdir, a Hugging Face directory or what `mmjax.load` returned.
  images: image paths, PIL images or uint8 [H, W, 3] arrays.
  prompts: with images, one text for all or one per image; without, the texts to continue.
  max_tokens: new tokens at most (default: 32, or fewer where the model's context ends).
  Returns one dict per input: its "image" (a path, else its index) or "text", the
  "prompt" when one was given, the "generated" texts (`num_samples` of them, best
  first for beams) and their "scores" (`mmjax.generate.Decoded.scores`).
  """
  s = settings(method=method, beams=beams, temperature=temperature, top_k=top_k,
               top_p=top_p, max_tokens=max_tokens, num_samples=num_samples,
               length_penalty=length_penalty, seed=seed)
  images = None if images is None else list(images)
  prompt_list = _prompts(prompts, images)
  pictures = None if images is None else [_read_image(im, i) for i, im in enumerate(images)]
  loaded = model if isinstance(model, io.Loaded) else io.load(model, what="workdir")
  module = loaded.model()
  _check_decoder(module, loaded.path, images is not None)
  if loaded.tokenizer is None:
    raise ValueError(f"{loaded.path}: no tokenizer (tokenizer.json, vocab.txt or vocab.json "
                     "+ merges.txt) to turn text into tokens")
  pixels = None if pictures is None else np.stack([loaded.preprocess(p) for p in pictures])
  # A prefix-LM trained on "[CLS] question [SEP] answer [SEP]" reads the whole question.
  prefix = loaded.config.get("data", {}).get("prefix_field", "")
  if prefix and prompts is None:
    raise ValueError(f"{loaded.path}: the model answers a {prefix!r} about each image "
                     f"(data.prefix_field): give it as the prompt")
  ids = [loaded.tokenizer.prompt_ids(p, whole=bool(prefix)) for p in prompt_list]
  s = dataclasses.replace(s, max_tokens=_max_tokens(ids, s.max_tokens,
                                                    module.text_tower.max_len))
  rng = jax.random.key(s.seed)
  results = []
  for start in range(0, len(ids), batch_size):
    chunk = slice(start, start + batch_size)
    got = _decode(module, loaded, ids[chunk], None if pixels is None else pixels[chunk], s,
                  jax.random.fold_in(rng, start))
    results += [_texts(loaded.tokenizer, tokens, scores)
                for tokens, scores in zip(np.asarray(got.tokens), np.asarray(got.scores))]
  return [{**_input(images, prompts, prompt_list, i), **r} for i, r in enumerate(results)]


def _input(images, prompts, prompt_list, i: int) -> dict[str, Any]:
  """What input `i` was: its image (a path, else its index) and prompt, or its text."""
  if images is None:
    return {"text": prompt_list[i]}
  image = images[i]
  got = {"image": str(image) if isinstance(image, (str, pathlib.Path)) else i}
  return got if prompts is None else dict(got, prompt=prompt_list[i])


def _check_decoder(model, path, images: bool) -> None:
  tower = getattr(model, "text_tower", None)
  if not (isinstance(tower, TextEncoder) and tower.causal and tower.head == "lm"):
    raise ValueError(f"{path}: its model has no text decoder (a causal text tower with an LM "
                     "head: model.text.causal=True, head='lm'), so it cannot generate")
  if tower.reads_images and not images:
    how = "cross-attention" if tower.cross else "an image prefix"
    raise ValueError(f"{path}: its decoder reads images ({how}): give images")
  if images and not tower.reads_images:
    raise ValueError(f"{path}: its decoder reads no images (a text-only language model): give "
                     "texts to continue instead")


def _prompts(prompts, images) -> list[str]:
  """One prompt text per input, checked; '' for an image without a prompt."""
  if images is not None and not images:
    raise ValueError("images=[]: no images to generate for")
  if prompts is None:
    if images is None:
      raise ValueError("no images and no prompts: give images, or texts for a language model "
                       "to continue")
    return [""] * len(images)       # a caption: the decoder starts from BOS alone
  if isinstance(prompts, str):
    prompts = [prompts] * (len(images) if images is not None else 1)
  prompts = list(prompts)
  if not prompts:
    raise ValueError("prompts=[]: no texts to continue")
  if images is not None and len(prompts) != len(images):
    raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one prompt for "
                     "all or one per image")
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise ValueError(f"prompt {i}: {type(p).__name__}, not a str")
    if not p.strip():
      raise ValueError(f"prompt {i} is empty: give the text to continue (or, for a captioner, "
                       "no prompt)")
  return prompts


def _read_image(image, i: int):
  """A path, PIL image or array -> what `ImagePreprocess` takes, checked."""
  if isinstance(image, (str, pathlib.Path)):
    try:
      return decode_image(pathlib.Path(image).expanduser())
    except DECODE_ERRORS as e:
      raise DataError(f"image {str(image)!r} is not a readable image ({e})") from None
  if isinstance(image, Image.Image):
    return image
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise DataError(f"image {i}: an array of {image.shape} {image.dtype}; expected uint8 "
                    "[H, W, 3]")
  return image


def _max_tokens(ids: list[list[int]], max_tokens: int | None, context: int) -> int:
  """`max_tokens` checked to fit the context after every prompt; None: the default, less
  what does not fit."""
  longest = max(map(len, ids))
  if max_tokens is None:
    max_tokens = max(1, min(DEFAULT_MAX_TOKENS, context - longest))
  if max_tokens >= context:
    raise ValueError(f"max_tokens={max_tokens} does not fit the model's context of {context} "
                     f"tokens (with a prompt: at most {context - 1})")
  for i, row in enumerate(ids):
    if len(row) + max_tokens > context:
      raise ValueError(f"prompt {i} is {len(row)} tokens; with max_tokens={max_tokens} the "
                       f"model's context of {context} tokens allows {context - max_tokens}")
  return max_tokens


def _decode(model, loaded: io.Loaded, ids: list[list[int]], pixels, s: Settings, rng):
  """decode() on right-padded prompts of `ids`."""
  tok = loaded.tokenizer
  length = max(map(len, ids))
  prompt_ids = np.full((len(ids), length), tok.pad_id, np.int32)
  prompt_mask = np.zeros((len(ids), length), np.int32)
  for row, seq in enumerate(ids):
    prompt_ids[row, :len(seq)], prompt_mask[row, :len(seq)] = seq, 1
  return decode(model, loaded.variables, prompt_ids, prompt_mask, images=pixels,
                max_new_tokens=s.max_tokens,
                eos_id=tok.eos_id, pad_id=tok.pad_id, method=s.method, rng=rng,
                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, num_beams=s.beams,
                length_penalty=s.length_penalty, num_return=s.num_samples)


def _texts(tokenizer, tokens: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
  """tokens [n, N], scores [n] of one input -> its texts, each cut before its first EOS."""
  texts = []
  for seq in tokens:
    seq = list(seq)
    end = seq.index(tokenizer.eos_id) if tokenizer.eos_id in seq else len(seq)
    texts.append(tokenizer.decode(np.asarray(seq[:end], np.int32)))
  return {"generated": texts, "scores": [round(float(x), 4) for x in scores]}


# --- `mmjax generate` --------------------------------------------------------------

def add_arguments(p) -> None:
  """The flags of `mmjax generate` on the argparse (sub)parser `p`."""
  p.add_argument("--workdir", required=True, metavar="WORKDIR_OR_HF_DIR",
                 help="an mmjax workdir (its latest checkpoint) or a Hugging Face directory")
  p.add_argument("--image", action="append", default=None, metavar="PATH",
                 help="an image to caption or ask about (repeatable)")
  p.add_argument("--text", action="append", default=None,
                 help="a text for a language model (GPT-2) to continue (repeatable)")
  p.add_argument("--prompt", default=None,
                 help="with --image: the decoder's prefix for every image (a question)")
  p.add_argument("--beams", type=int, default=None, help="beam search with N beams")
  p.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
  p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
  p.add_argument("--top-p", type=float, default=None,
                 help="sample from the fewest likeliest tokens holding probability p")
  p.add_argument("--length-penalty", type=float, default=1.0,
                 help="beam scores divide by length ** this")
  p.add_argument("--max-tokens", type=int, default=None,
                 help=f"new tokens at most (default {DEFAULT_MAX_TOKENS}, or what the model's "
                      "context leaves)")
  p.add_argument("--num-samples", type=int, default=1,
                 help="texts per input: samples, or the n best beams")
  p.add_argument("--seed", type=int, default=0, help="the sampling PRNG seed")
  p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)


# What a user's input can get wrong; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, io.CheckpointMismatch, io.UnreadableCheckpoint,
               io.UnsupportedModel)


def main(args) -> int:
  """`mmjax generate`: one JSON line per image or text on stdout; on bad input one line
  on stderr and exit code 2, nothing printed to stdout."""
  try:
    if args.text and args.image:
      raise ValueError("--text is a language model's input; with --image give the prefix "
                       "as --prompt")
    if args.text and args.prompt is not None:
      raise ValueError("give the texts to continue as --text or --prompt, not both")
    prompts = args.text if args.text else args.prompt
    results = generate(args.workdir, images=args.image, prompts=prompts, beams=args.beams,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       max_tokens=args.max_tokens, num_samples=args.num_samples,
                       length_penalty=args.length_penalty, seed=args.seed)
  except USER_ERRORS as e:
    if os.environ.get("MMJAX_TRACEBACK"):
      raise
    print(f"mmjax generate: error: {e}", file=sys.stderr)
    return 2
  for r in results:
    print(json.dumps(r, ensure_ascii=False))
  return 0
