"""`mmjax train | eval | demo` — the command line over the Python API.

  mmjax train --config configs/demo.py[:arg] --workdir DIR [--config.key=value ...]
  mmjax eval  --config configs/demo.py --workdir DIR [--step N]
  mmjax demo  [--workdir DIR] [--config.key=value ...]

Overrides are `--config.<dotted key>=<value>`; a key that does not exist fails
before anything is computed, naming the nearest valid key.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from mmjax.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mmjax", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  for name, text in (("train", "train a config (resumes from DIR's latest checkpoint)"),
                     ("eval", "evaluate DIR's latest checkpoint"),
                     ("demo", "train and evaluate the default config on built-in data")):
    s = sub.add_parser(name, help=text)
    s.add_argument("--config", default="demo" if name == "demo" else None,
                   required=name != "demo", help="configs/<name>.py[:arg] or a built-in name")
    s.add_argument("--workdir", default="workdirs/demo" if name == "demo" else None,
                   required=name != "demo")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    if name == "eval":
      s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  return p


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    config = load_config(args.config, overrides)
  except ConfigError as e:
    print(f"mmjax: config error: {e}", file=sys.stderr)
    return 2
  import mmjax  # after the config is known good: importing jax takes seconds

  os.makedirs(args.workdir, exist_ok=True)
  if args.command in ("train", "demo"):
    result = mmjax.train(config, args.workdir, progress=not args.no_progress)
  else:
    result = mmjax.evaluate(config, args.workdir, step=args.step)
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in sorted(result.items())}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
