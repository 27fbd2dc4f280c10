"""Checkpoints: DeepSpeed's model/optimizer shards plus our client state, ``latest`` last.

Layout of ``checkpoint.save``::

    DIR/
      latest                       # tag of the newest *complete* checkpoint, written atomically last
      iter_0000010/
        mp_rank_00_model_states.pt ...   # DeepSpeed (model, optimizer/ZeRO partitions)
        client_state.json           # step, consumed samples, sampler state (human-readable)
        config.yml                  # the resolved run config
        rng_state_rank{r}.pt        # python, numpy, torch (cpu/cuda) and TP-tracker RNG per rank

A crash at any point leaves ``latest`` naming the previous complete checkpoint, so a resume never
sees a partial one. DeepSpeed's own ``latest`` file is not written (``save_latest=False``).
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron.config import save_config
from megatron.parallel.random import RNGStatesTracker
from megatron.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, log_rank0

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unusable; the message names the path and the fix."""


def tag_for(step: int) -> str:
    return f"iter_{step:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state(tracker: RNGStatesTracker) -> dict[str, Any]:
    """Every RNG stream this rank uses."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tracker.state_dict(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], tracker: RNGStatesTracker) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tracker.load_state_dict(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine: Any,
    save_dir: str | Path,
    step: int,
    client_state: dict[str, Any],
    config: Any,
    tracker: RNGStatesTracker,
    keep_last: int | None = None,
) -> Path:
    """Save a complete checkpoint for ``step`` (collective: every rank calls it).

    Returns:
        The tag directory.
    """
    save_dir = Path(save_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state={}, save_latest=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag_dir = save_dir / tag
    buf = _torch_bytes(rng_state(tracker))
    atomic_write_bytes(tag_dir / f"rng_state_rank{rank}.pt", buf)
    if rank == 0:
        atomic_write_json(tag_dir / "client_state.json", client_state)
        save_config(config, tag_dir / "config.yml")
    _barrier()  # every shard and RNG file is on disk before `latest` moves
    if rank == 0:
        atomic_write_text(save_dir / LATEST, tag + "\n")
        if keep_last:
            _prune(save_dir, keep_last, keep=tag)
    _barrier()
    log_rank0("saved checkpoint %s", tag_dir)
    return tag_dir


def _torch_bytes(obj: Any) -> bytes:
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def _prune(save_dir: Path, keep_last: int, keep: str) -> None:
    tags = sorted(p for p in save_dir.glob("iter_*") if p.is_dir())
    for old in tags[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(load: str | Path) -> tuple[Path, str]:
    """``(checkpoint root, tag)`` from ``checkpoint.load`` (a run dir with ``latest``, or a tag dir).

    Raises:
        CheckpointError: nothing loadable there.
    """
    path = Path(load)
    if (path / LATEST).is_file():
        tag = (path / LATEST).read_text().strip()
        if not (path / tag).is_dir():
            raise CheckpointError(f"{path / LATEST} names {tag!r}, but {path / tag} does not exist")
        return path, tag
    if (path / "client_state.json").is_file():
        return path.parent, path.name
    if not path.exists():
        raise CheckpointError(
            f"checkpoint.load: {path} does not exist; give a directory written by checkpoint.save "
            "(it holds a 'latest' file) or one of its iter_* directories"
        )
    raise CheckpointError(
        f"checkpoint.load: {path} holds no 'latest' file and is not an iter_* checkpoint directory"
    )


def load_checkpoint(
    engine: Any, load: str | Path, finetune: bool, tracker: RNGStatesTracker
) -> dict[str, Any] | None:
    """Load weights (``finetune``) or everything (full resume) from ``load``.

    Returns:
        The client state for a full resume, ``None`` for ``finetune``.
    """
    root, tag = resolve_checkpoint(load)
    load_path, _ = engine.load_checkpoint(
        str(root),
        tag=tag,
        load_module_strict=True,
        load_optimizer_states=not finetune,
        load_lr_scheduler_states=False,
        load_module_only=finetune,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {root / tag}")
    log_rank0(
        "loaded checkpoint %s (%s)", root / tag, "weights only" if finetune else "full resume"
    )
    if finetune:
        return None
    client = json.loads((root / tag / "client_state.json").read_text())
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = root / tag / f"rng_state_rank{rank}.pt"
    if not rng_file.is_file():
        raise CheckpointError(
            f"{rng_file} is missing: the checkpoint was written by a different number of ranks; "
            "resume with the same grid, or set checkpoint.finetune: true to load weights only"
        )
    set_rng_state(torch.load(rng_file, weights_only=False), tracker)
    return client
