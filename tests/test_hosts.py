"""mmjax.data.hosts.allgather_bytes, the one way Python values cross processes: the
identity on one process, and on two processes on 127.0.0.1 the gather behind
ProcessStates.get_state (a streamed source's checkpointed position) and gather_rows
(the evaluators' generated text)."""
import json
import subprocess
import sys

import numpy as np

from conftest import ROOT
from mmjax.data.hosts import allgather_bytes
from mmjax.data.pipeline import ProcessStates
from mmjax.evals.embed import gather_rows
from test_multiprocess import _env, _free_port


def test_one_process_is_the_identity():
  items = [b"", b"caf\xc3\xa9", b"\x00\xff" * 300, bytearray(b"x")]
  assert allgather_bytes(items) == [[b"", "café".encode(), b"\x00\xff" * 300, b"x"]]
  assert allgather_bytes([]) == [[]]
  assert allgather_bytes(iter([b"a", b"b"])) == [[b"a", b"b"]]


def test_one_process_gathers_keep_their_values():
  columns = gather_rows({"id": np.arange(3), "caption": np.array(["a", "", "ü"])})
  np.testing.assert_array_equal(columns["id"], [0, 1, 2])
  assert columns["caption"].tolist() == ["a", "", "ü"]

  class Position:
    def get_state(self):
      return {"shard": 3, "offsets": (1, 2)}     # a tuple: not through JSON on one process
  assert ProcessStates(Position(), 0, 1).get_state() == {"processes": [{"shard": 3,
                                                                         "offsets": (1, 2)}]}


_TWO = r'''
import json, sys
import jax
import numpy as np

port, pid = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
from mmjax.data.hosts import allgather_bytes
from mmjax.data.pipeline import ProcessStates
from mmjax.evals.embed import gather_rows

# Different counts and lengths; process 1 passes nothing at first, then only empties.
mine = [[b'a', b'\xff\x00b', 'd\u00e9j\u00e0'.encode()], []][pid]
raw = allgather_bytes(mine)
empty = allgather_bytes([b''] * pid)

class Position:
  def get_state(self):
    return {'shard': pid, 'path': 'x' * (40 * pid), 'skipped': {}}
states = ProcessStates(Position(), pid, 2).get_state()

rows = gather_rows({'id': np.arange(2) + 10 * pid,
                    'caption': np.array([f'p{pid}', 'ab' * (5 * pid)]),
                    'ref': np.array(['\u00fc' * pid, f'r{pid}'], object)})
print(json.dumps(dict(raw=[[b.hex() for b in p] for p in raw],
                      empty=[[b.hex() for b in p] for p in empty], states=states,
                      rows={k: v.tolist() for k, v in rows.items()},
                      kinds={k: v.dtype.kind for k, v in rows.items()})))
'''


def test_two_processes_gather_each_others_bytes_states_and_rows():
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", _TWO, str(port), str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=_env())
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  got = [json.loads(out.splitlines()[-1]) for out, _ in outs]
  assert got[0] == got[1]                       # every process gets every process's
  want = [[b"a", b"\xff\x00b", "déjà".encode()], []]
  assert [[bytes.fromhex(h) for h in p] for p in got[0]["raw"]] == want
  assert got[0]["empty"] == [[], [""]]
  assert got[0]["states"] == {"processes": [{"shard": 0, "path": "", "skipped": {}},
                                            {"shard": 1, "path": "x" * 40, "skipped": {}}]}
  assert got[0]["rows"] == {"id": [0, 1, 10, 11], "caption": ["p0", "", "p1", "ab" * 5],
                            "ref": ["", "r0", "ü", "r1"]}
  assert got[0]["kinds"] == {"id": "i", "caption": "U", "ref": "U"}
