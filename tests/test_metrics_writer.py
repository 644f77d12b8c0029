"""metrics.jsonl and TensorBoard survive torn writes and kill -9 + resume."""
import json
import logging
import os
import struct
import time

import jax
import pytest

from mmjax.train.metrics_writer import MetricWriter, read_metrics
from mmjax.train.plot import plot_run

GOOD = [{"step": 10, "kind": "train", "loss": 2.0}, {"step": 20, "kind": "train", "loss": 1.0},
        {"step": 20, "kind": "eval", "acc": 0.5}]
TORN = b'{"step": 50, "kind": "tr'


def _write_lines(workdir, *lines: bytes):
  (workdir / "metrics.jsonl").write_bytes(b"".join(lines))


def _good_lines():
  return [json.dumps(r).encode() + b"\n" for r in GOOD]


def _steps(workdir):
  return [(r["kind"], r["step"]) for r in read_metrics(workdir)]


# --- torn and corrupt lines -------------------------------------------------------------

def test_read_metrics_skips_unreadable_lines_and_names_them(tmp_path, caplog):
  _write_lines(tmp_path, _good_lines()[0], b"\xff\xfe not utf-8\n", _good_lines()[1],
               b"[1, 2]\n", b"\n", _good_lines()[2], TORN)
  with caplog.at_level(logging.WARNING, logger="mmjax"):
    rows = read_metrics(tmp_path)
  assert rows == GOOD
  [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert str(tmp_path / "metrics.jsonl") in warning
  assert "3 unreadable" in warning and "line 2, 4, 7" in warning


def test_read_metrics_of_a_workdir_without_metrics_is_empty(tmp_path):
  assert read_metrics(tmp_path) == []


def test_plot_run_draws_a_run_whose_last_line_is_torn(tmp_path):
  _write_lines(tmp_path, *_good_lines(), TORN)
  out = plot_run(tmp_path)
  assert out == tmp_path / "training.png"
  assert out.read_bytes().startswith(b"\x89PNG")


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("lines", [
    [],                                                         # no metrics.jsonl
    [b""],                                                      # empty
    [TORN],                                                     # only a torn line
    [b'{"kind": "train", "loss": 1.0}\n',                       # no step
     b'{"step": 10, "loss": 1.0}\n',                            # no kind
     b'{"step": "ten", "kind": "train", "loss": 1.0}\n'],       # step not a number
    [b'{"step": 10, "kind": "train", "loss": NaN}\n',           # non-finite values
     b'{"step": 20, "kind": "train", "loss": Infinity}\n',
     b'{"step": 20, "kind": "eval", "acc": -Infinity}\n'],
    [b'{"step": 10, "kind": "train", "loss": "low"}\n',         # values not numbers
     b'{"step": 20, "kind": "eval", "acc": [0.5]}\n',
     b'{"step": 20, "kind": "eval", "acc2": null}\n'],
    [b'{"step": 10, "kind": "train", "loss": 1e308}\n',         # finite, but matplotlib
     b'{"step": 20, "kind": "train", "loss": 1.7e308}\n'],      # overflows its log ticks
], ids=["missing", "empty", "torn", "no-step-or-kind", "non-finite", "not-numbers", "overflow"])
def test_plot_run_with_nothing_to_draw_warns_and_returns_none(tmp_path, caplog, lines):
  if lines:
    _write_lines(tmp_path, *lines)
  with caplog.at_level(logging.WARNING, logger="mmjax"):
    assert plot_run(tmp_path) is None
  assert "training.png not drawn" in caplog.text
  assert not (tmp_path / "training.png").exists()


def test_plot_run_leaves_out_bad_rows_and_draws_the_rest(tmp_path, caplog):
  _write_lines(tmp_path, *_good_lines(),
               b'{"step": 30, "kind": "train", "loss": NaN, "itc_loss": "x"}\n',
               b'{"step": 30, "loss": 0.5}\n',
               b'{"step": 40, "kind": "train", "loss": Infinity}\n',
               b'{"step": 40, "kind": "eval", "acc": 0.7, "recall": 0.2}\n',
               b'{"step": 40, "kind": "eval", "acc": 0.8}\n')      # same step again: last wins
  with caplog.at_level(logging.WARNING, logger="mmjax"):
    out = plot_run(tmp_path)
  assert out is not None and out.exists()
  assert "left out 1 metrics row" in caplog.text


def test_plot_run_of_one_evaluation_with_keys_split_over_rows(tmp_path):
  # The bar chart of a single evaluation used to index the last row by every key.
  _write_lines(tmp_path, b'{"step": 50, "kind": "eval", "acc": 0.7}\n',
               b'{"step": 50, "kind": "eval", "recall": 0.2}\n')
  assert plot_run(tmp_path).exists()


def test_plot_run_that_cannot_save_warns_and_returns_none(tmp_path, caplog):
  _write_lines(tmp_path, *_good_lines())
  (tmp_path / "training.png").mkdir()      # savefig -> IsADirectoryError, as on a full disk
  with caplog.at_level(logging.WARNING, logger="mmjax"):
    assert plot_run(tmp_path) is None
  assert "training.png not drawn: IsADirectoryError" in caplog.text


def test_writer_after_a_torn_last_line_drops_it(tmp_path, caplog):
  _write_lines(tmp_path, *_good_lines(), TORN)
  with caplog.at_level(logging.WARNING, logger="mmjax"):
    w = MetricWriter(tmp_path)
  assert "dropped a torn last line 4" in caplog.text
  w.write(50, {"loss": 0.5})
  w.close()
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="mmjax"):
    assert read_metrics(tmp_path) == GOOD + [{"step": 50, "kind": "train", "loss": 0.5}]
  assert not caplog.records               # nothing glued, nothing left to skip


def test_writer_ends_a_whole_last_row_that_lost_its_newline(tmp_path):
  *first, last = _good_lines()
  _write_lines(tmp_path, *first, last.rstrip(b"\n"))
  w = MetricWriter(tmp_path)
  w.write(50, {"loss": 0.5})
  w.close()
  assert read_metrics(tmp_path) == GOOD + [{"step": 50, "kind": "train", "loss": 0.5}]


# --- resume -----------------------------------------------------------------------------

def _killed_run(workdir, steps=(10, 20, 30, 40, 50), evals=(30, 50)):
  """A run logging every 10 steps and evaluating at `evals`, killed after step 50."""
  w = MetricWriter(workdir)
  for s in steps:
    w.write(s, {"loss": float(s)})
    if s in evals:
      w.write(s, {"acc": s / 100}, kind="eval")
  w.close()


def _resumed_run(workdir, resume_step=30):
  w = MetricWriter(workdir, resume_step=resume_step)
  for s in range(resume_step + 10, 60, 10):
    w.write(s, {"loss": s + 0.5})
  w.write(50, {"acc": 0.9}, kind="eval")
  w.close()


def test_resume_logs_each_step_once(tmp_path):
  _killed_run(tmp_path)
  (tmp_path / "metrics.jsonl").chmod(0o644)
  _resumed_run(tmp_path, resume_step=30)
  assert _steps(tmp_path) == [("train", 10), ("train", 20), ("train", 30), ("eval", 30),
                              ("train", 40), ("train", 50), ("eval", 50)]
  rows = read_metrics(tmp_path)
  assert [r["loss"] for r in rows if r["kind"] == "train"] == [10, 20, 30, 40.5, 50.5]
  assert rows[-1]["acc"] == 0.9
  assert (tmp_path / "metrics.jsonl").stat().st_mode & 0o777 == 0o644
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]


def test_resume_from_zero_drops_a_run_killed_before_its_first_checkpoint(tmp_path):
  _killed_run(tmp_path)
  _resumed_run(tmp_path, resume_step=0)
  assert _steps(tmp_path) == [("train", s) for s in (10, 20, 30, 40, 50)] + [("eval", 50)]


def test_resume_drops_a_torn_last_line(tmp_path):
  _write_lines(tmp_path, *_good_lines(), b'{"step": 30, "kind": "train", "loss": 1.0}\n', TORN)
  MetricWriter(tmp_path, resume_step=20).close()
  assert (tmp_path / "metrics.jsonl").read_bytes() == b"".join(_good_lines())


def test_resume_rewrite_that_fails_leaves_the_file_whole(tmp_path, monkeypatch):
  _killed_run(tmp_path)
  before = (tmp_path / "metrics.jsonl").read_bytes()

  def crash(src, dst):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError, match="No space"):
    MetricWriter(tmp_path, resume_step=30)
  assert (tmp_path / "metrics.jsonl").read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]


def test_only_process_zero_rewrites_or_writes(tmp_path, monkeypatch):
  _killed_run(tmp_path)
  before = (tmp_path / "metrics.jsonl").read_bytes()
  tb_files = sorted((tmp_path / "tensorboard").iterdir())
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  w = MetricWriter(tmp_path, resume_step=30)
  w.write(40, {"loss": 1.0})
  w.close()
  assert (tmp_path / "metrics.jsonl").read_bytes() == before
  assert sorted((tmp_path / "tensorboard").iterdir()) == tb_files


# --- TensorBoard ------------------------------------------------------------------------

def _tb_scalars(logdir) -> dict[str, dict[int, float]]:
  """tag -> {step: value} as TensorBoard shows it: event files read in name order, and a
  SessionLog START at step P (what purge_step writes) hides every earlier event at a
  step >= P. Parses the TFRecord framing itself, so it needs no tensorboard install."""
  from tensorboardX.proto.event_pb2 import Event, SessionLog
  shown: dict[str, dict[int, float]] = {}
  for path in sorted(logdir.glob("*tfevents*")):
    data, at = path.read_bytes(), 0
    while at < len(data):
      (n,) = struct.unpack("<Q", data[at:at + 8])
      event = Event.FromString(data[at + 12:at + 12 + n])
      at += 12 + n + 4      # length, its crc, the record, its crc
      if event.HasField("session_log") and event.session_log.status == SessionLog.START:
        shown = {t: {s: v for s, v in sv.items() if s < event.step} for t, sv in shown.items()}
      for value in event.summary.value:
        steps = shown.setdefault(value.tag, {})
        assert event.step not in steps, f"{value.tag} logged twice at step {event.step}"
        steps[event.step] = value.simple_value
  return shown


def test_resume_hides_stale_tensorboard_events(tmp_path):
  _killed_run(tmp_path)
  _resumed_run(tmp_path, resume_step=30)
  shown = _tb_scalars(tmp_path / "tensorboard")
  assert shown["train/loss"] == {10: 10, 20: 20, 30: 30, 40: 40.5, 50: 50.5}
  assert shown["eval/acc"] == pytest.approx({30: 0.3, 50: 0.9})


def test_writers_opened_in_the_same_second_keep_their_own_event_files(tmp_path, monkeypatch):
  # tensorboardX names an event file by the second and opens it with "wb".
  monkeypatch.setattr(time, "time", lambda: 1_700_000_000.25)
  _killed_run(tmp_path, steps=(10, 20), evals=())
  _resumed_run(tmp_path, resume_step=20)
  assert len(list((tmp_path / "tensorboard").glob("*tfevents*"))) == 2
  assert _tb_scalars(tmp_path / "tensorboard")["train/loss"] == {10: 10, 20: 20, 30: 30.5,
                                                                   40: 40.5, 50: 50.5}
