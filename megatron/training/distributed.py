"""Process-group start-up shared by ``train.py``, tools and tests.

On machines without CUDA, DeepSpeed runs on its CPU accelerator with gloo
(``DS_ACCELERATOR=cpu``), and its shared-memory comm op (a 40-90 s JIT build) is switched off so
gloo does every collective (see shared/notes/cpu-feasibility.md).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch


def use_cuda() -> bool:
    return torch.cuda.is_available()


def import_deepspeed() -> Any:
    """Import DeepSpeed with the right accelerator selected for this machine."""
    if not use_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not use_cuda():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> torch.device:
    """Initialise torch.distributed from the launcher's env (single process when absent).

    Returns:
        This rank's device (``cuda:LOCAL_RANK`` or ``cpu``).
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed = import_deepspeed()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda() else "gloo", verbose=False)
    if use_cuda():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")
