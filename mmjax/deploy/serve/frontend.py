"""One front end of `mmjax serve --workers N` (started by workers.py, never by hand):

  python -m mmjax.deploy.serve.frontend '{"fd": 3, "channel": ".../model.sock", ...}'

It asks the model process for the model's info, loads the preprocessing and tokenizer
(no weights), and serves the same app as a single-process server on the listening socket
it inherited, its model calls going over the channel. It stops on SIGTERM (finishing its
requests in flight) and when the model process goes away.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys

from mmjax import io
from mmjax.deploy.serve.app import Settings, create_app, serve
from mmjax.deploy.serve.backend import ExportedBackend
from mmjax.deploy.serve.channel import RemoteService, hello
from mmjax.deploy.serve.inputs import Limits
from mmjax.deploy.serve.workdir_backend import WorkdirInputs


def main(argv: list[str]) -> int:
  logging.basicConfig(level=logging.INFO, format=f"front end {os.getpid()}: %(message)s")
  config = json.loads(argv[1])
  info, functions = hello(config["channel"])
  source = config["source"]
  if source["export"]:
    inputs = ExportedBackend.from_path(source["export"])
  else:
    inputs = WorkdirInputs(io.load(source["workdir"], source["step"], params=False), info)
  settings = dict(config["settings"])
  settings = Settings(**dict(settings, limits=Limits(**settings["limits"])))
  service = RemoteService(config["channel"], functions, settings.timeout_s)
  service.on_gone = lambda: os.kill(os.getpid(), signal.SIGTERM)
  app = create_app(inputs, settings, service)
  sock = socket.socket(fileno=config["fd"])
  started = serve(app, sock=sock, graceful_s=config["graceful_s"], http=config["http"])
  return 0 if started else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv))
