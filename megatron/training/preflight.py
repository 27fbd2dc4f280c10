"""Checks of the run's inputs and outputs that need the file system, before any rank starts.

``deepy.py`` runs them before launching and ``train.py`` before building the trainer, so a missing
or corrupt data file, a missing checkpoint or a save directory that would be overwritten is one
clear message naming the config key and the file — never a traceback from inside a rank. The
checkpoint to load is verified against its manifest and its saved config by
:mod:`megatron.training.checkpoint_verify`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron.config.validate import reference_source
from megatron.data.builders import build_data
from megatron.data.indexed import DatasetError
from megatron.objectives import get_objective
from megatron.training.checkpoint_verify import verify_checkpoint
from megatron.training.checkpointing import LATEST, CheckpointError, resolve_checkpoint
from megatron.training.reference import check_cache, expected_cache_key


def preflight(
    cfg: Any, fingerprints: bool = True, checksums: bool = True, writes_cache: bool = False
) -> list[str]:
    """Problems with the run's files, each ``dotted.key: message``; empty when all is well.

    Args:
        cfg: the resolved run config.
        fingerprints: also check that a ``reference.cache`` was computed for this run's
            reference weights, data and objective (hashes the reference checkpoint's files:
            ``deepy.py`` does it once before launching; the ranks' trainer checks it again).
        checksums: also compare the checkpoint's files with their manifest sha256 (sizes are
            always compared): a full read of the checkpoint, so once per launch, not per rank.
        writes_cache: ``reference.cache`` is what the launched program writes
            (``tools/precompute_reference.py``), not a cache to check.
    """
    problems = []
    local = cfg.launcher.num_nodes == 1 and not cfg.launcher.hostfile
    if cfg.training.precision == "fp16" and local and not torch.cuda.is_available():
        problems.append(
            "training.precision: fp16 needs a CUDA device (DeepSpeed's CPU accelerator refuses "
            "it); use bf16 or fp32 on CPU"
        )
    objective = get_objective(cfg.objective.name)(cfg.objective.params)
    try:
        train = build_data(
            objective.batch_kind,
            cfg.data,
            cfg.model.vocab_size,
            objective.collate_options(pipeline=cfg.parallel.pipeline > 1),
        ).train
        if len(train) < cfg.training.global_batch_size:
            problems.append(
                f"data.train: {len(train)} samples of data.seq_length {cfg.data.seq_length} "
                f"is fewer than one global batch ({cfg.training.global_batch_size}); add data or "
                "lower training.global_batch_size"
            )
    except DatasetError as e:
        problems.append(f"data: {e}")
    if fingerprints and not writes_cache and reference_source(cfg) == "cache":
        try:
            check_cache(cfg.reference.cache, expected_cache_key(cfg, objective))
        except CheckpointError as e:
            problems.append(str(e))
    if cfg.training.eval_tasks:
        from megatron.evaluation.in_loop import check_eval_tasks

        problems += check_eval_tasks(cfg)
    ck = cfg.checkpoint
    load_root = None
    if ck.load:
        try:
            load_root, _ = resolve_checkpoint(ck.load)
            problems += verify_checkpoint(cfg, checksums)
        except CheckpointError as e:
            problems.append(str(e))
    if ck.save and (Path(ck.save) / LATEST).is_file():
        same = load_root is not None and Path(load_root).resolve() == Path(ck.save).resolve()
        if not same:
            problems.append(
                f"checkpoint.save: {ck.save} already holds checkpoints (see its 'latest'); "
                f"set checkpoint.load: {ck.save} to resume there, or save to a new directory "
                "(nothing is overwritten)"
            )
    return problems
