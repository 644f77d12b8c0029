"""`mmjax train | eval | demo | convert` — the command line over the Python API.

  mmjax train --config configs/demo.py[:arg] --workdir DIR [--config.key=value ...]
  mmjax finetune --config configs/finetune_digits.py[:arg] --init CKPT_OR_HF_DIR --workdir DIR
  mmjax finetune --data IMAGES_DIR_OR_FILE --workdir DIR [--init CKPT_OR_HF_DIR]
  mmjax eval  --workdir DIR [--config configs/demo.py] [--step N]
  mmjax demo  [--workdir DIR] [--config.key=value ...]
  mmjax convert --from-hf HF_DIR --to WORKDIR [--config BASE.py] [--image-size N]
  mmjax convert --to-hf WORKDIR --out HF_DIR [--step N]
  mmjax export --workdir DIR --out EXPORT_DIR [--what image,text,zeroshot,classify,caption]
      [--format stablehlo|onnx] [--step N]
  mmjax quantize --workdir DIR --out NEW_DIR --mode int8-weight|w8a8 [--calibration-steps N]
  mmjax generate --workdir DIR --image a.png [--prompt TEXT] [--beams 4 | --temperature 0.8
      --top-k 40 --top-p 0.95] [--max-tokens 32] [--num-samples 3]
  mmjax generate --workdir GPT2_DIR --text "Once upon a time" [--text ...]
  mmjax serve --workdir DIR | --export EXPORT_DIR [--host 127.0.0.1 --port 8000 --max-batch 16
      --max-wait-ms 5 --queue 256 --timeout-s 30 --no-batching]

Overrides are `--config.<dotted key>=<value>`; a key that does not exist fails
before anything is computed, naming the nearest valid key.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mmjax import io
from mmjax.config import ConfigError, load_config
from mmjax.data import DataError
from mmjax.deploy import export as export_lib
from mmjax.deploy import quantize as quantize_lib
from mmjax.deploy.serve import command as serve_command
from mmjax.generate import run as generate_run
from mmjax.io import CheckpointMismatch, UnreadableCheckpoint, UnsupportedModel
from mmjax.train.loop import NonFiniteLoss, evaluate, finetune, train
from mmjax.train.metrics_writer import MetricsUploadError
from mmjax.train.state import initial_state


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mmjax", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  for name, text in (("train", "train a config (resumes from DIR's latest checkpoint)"),
                     ("finetune", "train a config starting from a pretrained mmjax workdir "
                                  "or Hugging Face directory (--init)"),
                     ("eval", "evaluate DIR's latest checkpoint"),
                     ("demo", "train and evaluate the default config on built-in data")):
    s = sub.add_parser(name, help=text)
    s.add_argument("--config", default="demo" if name == "demo" else None,
                   help="configs/<name>.py[:arg] or a built-in name" +
                        (" (default: the workdir's own config.json)" if name == "eval" else ""))
    if name in ("train", "finetune"):
      s.add_argument("--data", default=None, metavar="IMAGES_DIR_OR_FILE",
                     help="your labelled images: a folder root/<class>/*.jpg or a JSONL/CSV "
                          "of image paths and labels; without --config, the recipe of "
                          "configs/classify_files.py, with it, sets config.data.path")
    s.add_argument("--workdir", default="workdirs/demo" if name == "demo" else None,
                   required=name != "demo")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    if name == "eval":
      s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    if name == "finetune":
      s.add_argument("--init", default=None, metavar="CKPT_OR_HF_DIR",
                     help="pretrained mmjax workdir or HF directory (default: config.init.path)")
  export_lib.add_arguments(sub.add_parser(
      "export", help="StableHLO (jax.export) or ONNX files of a workdir's model that run "
                     "without mmjax's model code"))
  c = sub.add_parser("convert", help="Hugging Face directory <-> mmjax workdir")
  way = c.add_mutually_exclusive_group(required=True)
  way.add_argument("--from-hf", metavar="HF_DIR", help="config.json + model.safetensors")
  way.add_argument("--to-hf", metavar="WORKDIR", help="an mmjax workdir (its latest step)")
  c.add_argument("--to", metavar="WORKDIR", help="with --from-hf: the mmjax workdir to write")
  c.add_argument("--out", metavar="HF_DIR", help="with --to-hf: the directory to write")
  c.add_argument("--config", default=None,
                 help="with --from-hf: run config whose data/optim/evals (and fusion) the "
                      "workdir uses (default: configs/demo.py without evals)")
  c.add_argument("--image-size", type=int, default=0, help="resample position embeddings")
  c.add_argument("--max-len", type=int, default=0, help="padded text length of batches")
  c.add_argument("--allow-missing", default="",
                 help="regex of mmjax params that may be absent (new heads, fusion)")
  c.add_argument("--step", type=int, default=None, help="with --to-hf: checkpoint step")
  quantize_lib.add_arguments(sub.add_parser(
      "quantize", help="a new workdir with int8 weights (int8-weight) or int8 weights and "
                       "inputs (w8a8) of every Dense layer (qwix)"))
  serve_command.add_arguments(sub.add_parser(
      "serve", help="an HTTP server (FastAPI) for a workdir's or export's model: embeddings, "
                    "zero-shot, classify, caption; dynamic batching; a browser page at /"))
  generate_run.add_arguments(sub.add_parser(
      "generate", help="caption images, answer questions or continue texts (one JSON line "
                       "per input)"))
  return p


def _convert(args, overrides: list[str]) -> int:
  if args.from_hf:
    if not args.to:
      print("mmjax: convert --from-hf needs --to WORKDIR", file=sys.stderr)
      return 2
    base = load_config(args.config, overrides) if args.config else None
    p = io.from_pretrained(args.from_hf, image_size=args.image_size, max_len=args.max_len,
                           allow_missing=args.allow_missing)
    out = os.path.abspath(args.to)
    config = io.workdir.run_config(p, base, os.path.join(out, "tokenizer.json")
                                   if p.tokenizer is not None else "")
    params = p.params
    if config.model.get("fusion"):   # kept from the base config: it must be allowed missing
      params = io.hf.load_params(args.from_hf, config, allow_missing=args.allow_missing)
    io.workdir.write_workdir(out, config, initial_state(config, params,
                                                        batch_stats=p.batch_stats),
                             p.hf_config, p.tokenizer)
    print(json.dumps({"architecture": p.architecture, "workdir": out,
                      "config": os.path.join(out, "config.py")}))
    return 0
  if not args.out:
    print("mmjax: convert --to-hf needs --out HF_DIR", file=sys.stderr)
    return 2
  loaded = io.load(args.to_hf, args.step, what="--to-hf")
  if loaded.kind != "workdir":
    print(f"mmjax: convert --to-hf takes an mmjax workdir; {args.to_hf} is a Hugging Face "
          f"directory already", file=sys.stderr)
    return 2
  io.save_pretrained(args.out, loaded.config, loaded.params, hf_config_base=loaded.hf_config,
                     tokenizer=loaded.tokenizer, batch_stats=loaded.batch_stats)
  print(json.dumps({"workdir": str(loaded.path), "step": loaded.step,
                    "out": os.path.abspath(args.out)}))
  return 0


# Problems with the user's data, config, checkpoint or workdir: the message says what and
# where; a traceback would only bury it (MMJAX_TRACEBACK=1 shows it).
USER_ERRORS = (ConfigError, DataError, NonFiniteLoss, CheckpointMismatch, UnreadableCheckpoint,
               UnsupportedModel, FileNotFoundError, ValueError, KeyError)


def _message(e: BaseException) -> str:
  # KeyError's str() is the repr of its argument, quotes and all.
  return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
  # force: absl (imported by ml_collections) has already put a handler on the root logger.
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                      force=True)
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # gcsfs (and google-auth under it) warn on every request without project credentials,
  # and gcsfs logs each failure's stack trace; the failures that matter reach the user as
  # errors.
  logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
  logging.getLogger("google.auth").setLevel(logging.ERROR)
  logging.getLogger("fsspec").setLevel(logging.WARNING)
  workdir = getattr(args, "workdir", None)
  try:     # a gs:// workdir that does not answer: one line, in seconds, nothing written
    if workdir:
      io.storage.check(workdir, "--workdir")
  except (io.RemoteUnreachable, ValueError) as e:    # ValueError: a bad MMJAX_REMOTE_TIMEOUT
    print(f"mmjax {args.command}: error: {e}", file=sys.stderr)
    return 2
  if args.command == "generate":
    return generate_run.main(args)
  if args.command == "export":
    return export_lib.main(args)
  if args.command == "quantize":
    return quantize_lib.main(args)
  if args.command == "serve":
    return serve_command.main(args)
  if args.command == "convert":
    try:
      return _convert(args, overrides)
    except USER_ERRORS as e:
      if os.environ.get("MMJAX_TRACEBACK"):
        raise
      print(f"mmjax convert: error: {_message(e)}", file=sys.stderr)
      return 2
  data = getattr(args, "data", None)
  if args.command in ("train", "finetune") and not (args.config or data):
    print(f"mmjax {args.command}: give --config CONFIG[:arg] or --data PATH", file=sys.stderr)
    return 2
  try:
    if data is not None and args.config is None:
      config = load_config(f"classify_files:{data}", overrides)
    elif data is not None:
      config = load_config(args.config, overrides + [f"--config.data.path={data}"])
    else:
      config = load_config(args.config, overrides) if args.config else None
  except ConfigError as e:
    print(f"mmjax: config error: {e}", file=sys.stderr)
    return 2
  if config is None and overrides:
    print(f"mmjax {args.command}: --config.* overrides need --config", file=sys.stderr)
    return 2
  try:
    if args.command in ("train", "demo"):
      result = train(config, args.workdir, progress=not args.no_progress)
    elif args.command == "finetune":
      result = finetune(config, args.workdir, init=args.init, progress=not args.no_progress)
    else:
      result = evaluate(config, args.workdir, step=args.step)
  except USER_ERRORS as e:
    if os.environ.get("MMJAX_TRACEBACK"):
      raise
    print(f"mmjax {args.command}: error: {_message(e)}", file=sys.stderr)
    # 1: the run started and failed (a non-finite loss); 2: what it was given is wrong
    # (config, data, checkpoint, workdir), as for every other command.
    return 1 if isinstance(e, NonFiniteLoss) else 2
  except MetricsUploadError as e:     # the run is done and checkpointed; its metrics not all
    print(f"mmjax {args.command}: error: {e}", file=sys.stderr)
    return 1
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in sorted(result.items())}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
