"""Small shared helpers: the rank-0 logger and atomic file writes."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch.distributed as dist

logger = logging.getLogger("megatron")


def global_rank() -> int:
    """This process's rank in the world (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def log_rank0(msg: str, *args: Any, level: int = logging.INFO) -> None:
    """Log on global rank 0 only (the one rank-0 helper the library uses instead of print)."""
    if global_rank() == 0:
        logger.log(level, msg, *args)


def setup_logging(level: int = logging.INFO) -> None:
    """Console logging for applications (``train.py``, tools); the library never calls it."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", force=False)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``.

    Readers see the old content or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """:func:`atomic_write_bytes` for an indented JSON document."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def update_hash(h: Any, path: str | Path, block: int = 16 << 20) -> Any:
    """Feed the bytes of the file ``path`` to the hashlib object ``h`` (``block`` bytes at a
    time) and return ``h``."""
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h
