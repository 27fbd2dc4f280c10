"""Shared pieces of the end-to-end training tests: a synthetic corpus, its run, pool jobs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from megatron.data.indexed import IndexedDatasetWriter
from tests.helpers_runs import MARKOV_VOCAB, tiny_run_config

VOCAB = MARKOV_VOCAB
EOS = 0


def write_markov_corpus(prefix: Path, docs: int = 200, seed: int = 0) -> Path:
    """Documents from a sparse first-order Markov chain (learnable: loss falls fast), EOS-ended.

    The chain is fixed; ``seed`` only changes which documents are drawn from it (so a corpus with
    another seed is held-out data from the same distribution).
    """
    nxt = np.random.default_rng(0).integers(1, VOCAB, size=(VOCAB, 3))
    rng = np.random.default_rng(1000 + seed)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(docs):
            tok = [int(rng.integers(1, VOCAB))]
            for _ in range(int(rng.integers(8, 40))):
                tok.append(int(nxt[tok[-1], rng.integers(0, 3)]))
            w.add_document(np.array(tok + [EOS]))
    return prefix


def run_config(tmp: Path, data_prefix: Path, **overrides: object) -> dict:
    """The ``markov`` tiny run on ``data_prefix``, logging under ``tmp / "logs"``.

    See :func:`tests.helpers_runs.tiny_run_config` (dotted ``overrides`` applied).
    """
    return tiny_run_config("markov", train=data_prefix, logs=tmp / "logs", **overrides)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_losses(metrics_file: Path) -> dict[int, float]:
    import json

    out = {}
    for line in metrics_file.read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def precompute_in_pool(rank, world, cfg_path, overrides):
    """DistPool job: ``precompute_reference`` of the run; returns the cache path."""
    from megatron.config import load_config
    from megatron.training.reference import precompute_reference

    return str(precompute_reference(load_config([cfg_path], overrides, world)))


def start_error_in_pool(rank, world, cfg_path, overrides):
    """DistPool job: the trainer's set-up only; returns the error text, if any."""
    from megatron.config import load_config
    from megatron.training.trainer import Trainer

    try:
        Trainer(load_config([cfg_path], overrides, world))
    except Exception as e:  # noqa: BLE001 - the test inspects the message
        return f"{type(e).__name__}: {e}"
    return None
