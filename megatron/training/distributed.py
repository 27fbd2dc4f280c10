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
    if torch.distributed.is_initialized():
        # Already set up by the caller (tests, notebooks): make the env agree with it.
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
        os.environ.setdefault("LOCAL_RANK", str(rank))
    elif "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed = import_deepspeed()
    # DeepSpeed's comm layer wraps an existing torch process group rather than creating one.
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda() else "gloo", verbose=False)
    if use_cuda():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")
