"""metrics.jsonl after a resume: each step once (MetricsLogger.resume)."""

from __future__ import annotations

import json

from megatron.training.metrics import MetricsLogger


def _records(path):
    return [(r["split"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


def _attempt(run_dir, start, stop, eval_every=2):
    """A run from ``start`` to ``stop`` logging as the trainer does (baseline at step 0)."""
    log = MetricsLogger(run_dir, enabled=True)
    log.resume(start)
    if start == 0:
        log.log(0, {"loss": 1.0}, split="valid")
    for step in range(start + 1, stop + 1):
        log.log(step, {"loss": 1.0 / step})
        if step % eval_every == 0:
            log.log(step, {"loss": 2.0 / step}, split="valid")
    log.close()


def test_resume_drops_the_steps_run_again_and_keeps_the_rest(tmp_path):
    _attempt(tmp_path, 0, 5)  # crashed after step 5; its last checkpoint is step 2
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "spl')  # a line cut by the crash
    _attempt(tmp_path, 2, 6)
    assert _records(tmp_path / "metrics.jsonl") == [
        ("valid", 0),
        ("train", 1),
        ("train", 2),
        ("valid", 2),
        *[r for s in (3, 4, 5, 6) for r in [("train", s)] + [("valid", s)] * (s % 2 == 0)],
    ]


def test_a_fresh_start_rewrites_the_file_and_other_ranks_write_nothing(tmp_path):
    _attempt(tmp_path, 0, 3)
    _attempt(tmp_path, 0, 1)  # started again from scratch: baseline and step 1 once
    assert _records(tmp_path / "metrics.jsonl") == [("valid", 0), ("train", 1)]
    # the earlier attempt's records are not lost: they move to metrics.prev.jsonl
    assert _records(tmp_path / "metrics.prev.jsonl")[:4] == [
        ("valid", 0),
        ("train", 1),
        ("train", 2),
        ("valid", 2),
    ]
    other = MetricsLogger(tmp_path / "rank1", enabled=False)
    other.resume(4)
    assert not (tmp_path / "rank1").exists()


def test_an_evaluation_after_close_is_appended(tmp_path):
    """Trainer.evaluate() after train() (which closes the logger) still records its values."""
    _attempt(tmp_path, 0, 2)
    log = MetricsLogger(tmp_path, enabled=True)
    log.close()
    log.log(2, {"loss": 0.5}, split="valid")
    log.close()
    assert _records(tmp_path / "metrics.jsonl")[-1] == ("valid", 2)
