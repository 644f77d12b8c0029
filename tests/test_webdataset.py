"""webdataset shards (img2dataset's layout): reading, bad shards and samples, exact resume,
grain workers; and every example once per epoch over two processes (webdataset and TFDS)."""
import gc
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

import fsspec

from mmjax import data as mmdata
from mmjax.config import data_block
from mmjax.data import webdataset_source as wds
from mmjax.data.errors import DataError

from conftest import ROOT, xla_flags
from test_data import _tiny_tfds
from test_multiprocess import _free_port


class DefaultCredentialsError(Exception):
  """google.auth's error when no credentials are found (the package is not installed)."""


DefaultCredentialsError.__module__ = 'google.auth.exceptions'


class _NoCredentials(fsspec.AbstractFileSystem):
  protocol = 'nocreds'

  def _open(self, path, mode='rb', **kwargs):
    raise DefaultCredentialsError('Your default credentials were not found. To set up ...')


fsspec.register_implementation('nocreds', _NoCredentials, clobber=True)


def _png(value: int) -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(out, format='PNG')
  return out.getvalue()


def _add(tar, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def write_shards(folder, shards: int, per_shard: int, *, stats=False) -> list[str]:
  """`folder/0000s.tar` as img2dataset writes them; keys `s-i`. Odd samples caption in
  .json, even in .txt. Returns the keys."""
  keys = []
  os.makedirs(folder, exist_ok=True)
  for s in range(shards):
    with tarfile.open(os.path.join(folder, f'{s:05d}.tar'), 'w') as tar:
      for i in range(per_shard):
        key = f'{s}-{i}'
        _add(tar, f'{key}.jpg', _png(10 * s + i))
        if i % 2:
          _add(tar, f'{key}.json', json.dumps({'caption': f'picture {key}', 'url': 'x'}).encode())
        else:
          _add(tar, f'{key}.txt', f'picture {key}'.encode())
        keys.append(key)
    if stats:
      with open(os.path.join(folder, f'{s:05d}_stats.json'), 'w') as f:
        json.dump({'successes': per_shard, 'count': per_shard}, f)
  return keys


def _data(folder, shards: int, **fields):
  return data_block('webdataset', shards=f'{folder}/{{00000..{shards - 1:05d}}}.tar',
                    image_size=8, max_len=8, tokenizer='', vocab_size=60, **fields)


def _keys(stream, n=None) -> list[str]:
  it = iter(stream)
  out = []
  for example in it:
    out.append(example['key'])
    if n is not None and len(out) == n:
      break
  return out


def test_reads_img2dataset_shards_from_a_brace_pattern(tmp_path):
  keys = write_shards(tmp_path / 's', 3, 4, stats=True)
  source = mmdata.build_source(_data(tmp_path / 's', 3), 'train')
  assert source.urls[-1].endswith('s/00002.tar') and len(source) == 12
  examples = {source[i]['key']: source[i] for i in range(12)}
  assert sorted(examples) == sorted(keys)
  assert examples['2-1']['caption'] == 'picture 2-1'         # from the .json
  assert examples['2-2']['caption'] == 'picture 2-2'         # from the .txt
  assert examples['2-1']['image'].shape == (6, 6, 3) and examples['2-1']['image'][0, 0, 0] == 21
  # One epoch of the stream is every sample once, shuffled.
  stream = source.stream(seed=0, process_index=0, process_count=1, num_epochs=1)
  order = _keys(stream)
  assert sorted(order) == sorted(keys) and order != keys
  # An eval split is read into memory and padded into equal batches like the other sources.
  data = _data(tmp_path / 's', 3, eval_shards=f'{tmp_path}/s/{{00000..00001}}.tar',
               cache_dir=str(tmp_path / 'c'))
  batches = list(mmdata.make_iterator(data, 'test', batch_size=5, train=False,
                                      tokenizer=mmdata.get_tokenizer(data), process_index=0,
                                      process_count=1))
  assert [b['valid'].sum() for b in batches] == [5, 3]
  assert [k for b in batches for k, v in zip(b['key'], b['valid']) if v] == keys[:8]


def test_bad_shards_and_samples_are_counted_skips_not_hangs(tmp_path):
  write_shards(tmp_path / 's', 2, 4)
  with tarfile.open(tmp_path / 's' / '00002.tar', 'w') as tar:
    _add(tar, 'nocap.jpg', _png(1))                 # no caption
    _add(tar, 'noimg.txt', b'a caption alone')      # no image
    _add(tar, 'junk.jpg', b'not an image')          # does not decode
    _add(tar, 'junk.txt', b'junk')
    _add(tar, 'ok.png', _png(2))
    _add(tar, 'ok.txt', b'fine')
  whole = (tmp_path / 's' / '00001.tar').read_bytes()
  (tmp_path / 's' / '00001.tar').write_bytes(whole[:len(whole) * 2 // 3])   # truncated
  source = mmdata.build_source(_data(tmp_path / 's', 3, shuffle_buffer=3), 'train')
  it = iter(source.stream(seed=1, process_index=0, process_count=1, num_epochs=1))
  got = _keys(it)
  assert set(got) >= {'0-0', '0-1', '0-2', '0-3', '1-0', 'ok'} and '1-3' not in got
  assert len(got) == len(set(got))
  assert it.get_state()['skipped'] == {'truncated or unreadable shard': 1, 'no caption': 1,
                                       'no image': 1, 'undecodable image': 1}
  # Nothing readable at all: an error after one pass, not an endless loop over epochs.
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / '00000.tar').write_bytes(b'\0' * 10)
  bad = mmdata.build_source(_data(tmp_path / 'bad', 1), 'train')
  with pytest.raises(DataError, match='no readable sample'):
    next(iter(bad.stream(seed=0, process_index=0, process_count=1, num_epochs=None)))


def test_missing_shards_and_unreadable_urls_name_the_shard(tmp_path):
  write_shards(tmp_path / 's', 1, 2)
  with pytest.raises(DataError, match=r'data.shards: shard .*00001.tar does not exist'):
    mmdata.build_source(_data(tmp_path / 's', 2), 'train')
  with pytest.raises(DataError, match='data.eval_shards: not set'):
    mmdata.build_source(_data(tmp_path / 's', 1), 'test')
  with pytest.raises(DataError, match=r'webdataset shard nosuchfs://b/0.tar: cannot open it'):
    next(wds.read_samples('nosuchfs://b/0.tar', wds.Skips()))
  # A store without credentials (what gcsfs raises, from google.auth): one line naming it.
  with pytest.raises(DataError, match=r'^webdataset shard nocreds://b/0.tar: cannot open it '
                                      r'\(DefaultCredentialsError: Your default credentials'):
    next(wds.read_samples('nocreds://b/0.tar', wds.Skips()))
  # Any fsspec URL reads (memory:// stands in for gs:// here).
  with fsspec.open('memory://bucket/00000.tar', 'wb') as f:
    f.write((tmp_path / 's' / '00000.tar').read_bytes())
  source = wds.WebDataset(wds.expand('memory://bucket/{00000..00000}.tar'))
  assert sorted(e['caption'] for e in source) == ['picture 0-0', 'picture 0-1']


def test_resume_continues_the_exact_stream(tmp_path):
  write_shards(tmp_path / 's', 3, 5)
  source = mmdata.build_source(_data(tmp_path / 's', 3, shuffle_buffer=4), 'train')
  assert len(source) == 15       # counted by reading the shards: no _stats.json here
  stream = source.stream(seed=3, process_index=0, process_count=1, num_epochs=2)
  whole = _keys(stream)
  assert len(whole) == 30 and sorted(whole[:15]) == sorted(whole[15:])
  for cut in (6, 15, 22):       # mid-block, at the epoch's end, in the second epoch
    first = iter(stream)
    head = _keys(first, cut)
    state = json.loads(json.dumps(first.get_state()))     # as the checkpoint stores it
    second = iter(stream)
    second.set_state(state)
    assert head + _keys(second) == whole, cut


@pytest.mark.slow
def test_batches_with_grain_workers_resume_and_cover_the_epoch(tmp_path):
  write_shards(tmp_path / 's', 4, 6)
  data = _data(tmp_path / 's', 4, shuffle_buffer=4, num_workers=2,
               cache_dir=str(tmp_path / 'c'))
  tok = mmdata.get_tokenizer(data)
  make = lambda: mmdata.make_iterator(data, 'train', batch_size=3, train=True, tokenizer=tok,
                                      process_index=0, process_count=1, num_epochs=1)
  it = make()
  first = [next(it) for _ in range(2)]
  assert first[0]['image'].shape == (3, 8, 8, 3) and first[0]['text'].shape == (3, 8)
  state = json.loads(json.dumps(it.get_state()))
  rest = [b['key'] for b in it]
  seen = [k for b in first for k in b['key']] + [k for b in rest for k in b]
  assert sorted(seen) == sorted(f'{s}-{i}' for s in range(4) for i in range(6))
  resumed = make()
  resumed.set_state(state)
  assert [list(b['key']) for b in resumed] == [list(k) for k in rest]
  with pytest.raises(DataError, match='saved by 2 processes and this run has 1'):
    make().set_state({'processes': [state['processes'][0]] * 2})
  del it, resumed
  gc.collect()        # the worker processes go now, not in a later test


_TWO_PROCESSES = r'''
import json, sys
import jax, ml_collections
import fsspec

from mmjax import data as mmdata
from mmjax.config import data_block
port, pid, folder, tfds_dir = sys.argv[1:5]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=int(pid))
common = dict(image_size=8, max_len=8, tokenizer='', vocab_size=60, cache_dir=folder + '/c' + pid)
web = data_block('webdataset', shards=folder + '/{00000..00004}.tar', shuffle_buffer=4, **common)
tfds = data_block('tfds', tfds_name='tiny_pairs', data_dir=tfds_dir, text_key='caption', **common)
out = {}
for name, data, batch in (('webdataset', web, 2), ('tfds', tfds, 5)):
  tok = mmdata.get_tokenizer(data)
  it = mmdata.make_iterator(data, 'train', batch_size=batch, train=True, tokenizer=tok,
                            num_epochs=1)
  first = next(it)
  state = it.get_state()               # webdataset: gathered from both processes
  out[name] = dict(seen=[str(c) for b in [first, *it] for c in b['caption']],
                   states=len(state.get('processes', [])))
print(json.dumps(out))
'''


@pytest.mark.slow
def test_two_processes_see_every_example_once_per_epoch(tmp_path):
  """Each process reads its own shards (webdataset) or records (TFDS); together one epoch
  is every example exactly once."""
  write_shards(tmp_path / 's', 5, 4)           # 5 shards: 3 for one process, 2 for the other
  _tiny_tfds(tmp_path / 'tfds')                # 10 train examples
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices=1), PYTHONPATH=str(ROOT))
  procs = [subprocess.Popen([sys.executable, '-c', _TWO_PROCESSES, str(port), str(i),
                             str(tmp_path / 's'), str(tmp_path / 'tfds')],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  runs = [json.loads(out.splitlines()[-1]) for out, _ in outs]
  web = [r['webdataset']['seen'] for r in runs]
  assert not set(web[0]) & set(web[1])
  assert sorted(web[0] + web[1]) == sorted(f'picture {s}-{i}' for s in range(5) for i in range(4))
  assert sorted(map(len, web)) == [8, 12] and runs[0]['webdataset']['states'] == 2
  tfds = [r['tfds']['seen'] for r in runs]
  assert len(tfds[0]) == len(tfds[1]) == 5 and not set(tfds[0]) & set(tfds[1])
  assert sorted(tfds[0] + tfds[1]) == sorted(f'thing number {i}' for i in range(10))
