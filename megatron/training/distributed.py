"""Process-group start-up shared by ``train.py``, tools and tests.

Where a process's rank comes from, in order:

1. ``torch.distributed`` is already initialised (tests, notebooks): its rank and size.
2. The launcher's variables, read by :func:`megatron.training.rank_discovery.discover` (torchrun
   and the DeepSpeed runner, Slurm's ``srun``, Open MPI, MPICH / Intel MPI, MVAPICH, PMIx, with
   mpi4py filling in what a launcher leaves out). Partial or contradictory variables are an
   error, never N independent one-process runs.
3. No launcher at all: the process runs alone (world size 1, a free loopback port for its store).

:func:`init_distributed` creates the process group from the :class:`DistEnv` with explicit
arguments and leaves ``os.environ`` as it found it.

On machines without CUDA, DeepSpeed runs on its CPU accelerator with gloo
(``DS_ACCELERATOR=cpu``), and its shared-memory comm op (a 40-90 s JIT build) is switched off so
gloo does every collective (see shared/notes/cpu-feasibility.md).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed.distributed_c10d as c10d

from megatron.training.rank_discovery import (
    LOOPBACK,
    RANK_VARS,
    DistEnv,
    LaunchEnvError,
    discover,
    expand_hostlist,
)

__all__ = [
    "RANK_VARS",
    "DistEnv",
    "LaunchEnvError",
    "discover",
    "expand_hostlist",
    "free_port",
    "import_deepspeed",
    "init_distributed",
]


def use_cuda() -> bool:
    """Whether this process runs on CUDA devices."""
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
    """A TCP port on the loopback interface that was free a moment ago."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def init_distributed(
    environ: Mapping[str, str] | None = None, *, timeout_s: float | None = None
) -> DistEnv:
    """Create the process group (unless the caller did) and hand it to DeepSpeed.

    ``torch.distributed.init_process_group`` gets backend, store address, rank and world size as
    arguments; ``os.environ`` is not written (see :func:`export_local_rank` for the one variable
    DeepSpeed's engine needs).

    ``timeout_s`` bounds every collective of every group (see :func:`set_collective_timeout`), so
    a stalled or dead peer becomes an error instead of a silent hang.

    Args:
        environ: the variables to read; default ``os.environ``.
        timeout_s: collective timeout in seconds (``training.collective_timeout_s``); None:
            torch's defaults (30 min on gloo, 10 min on NCCL). Not applied to a group the
            caller made.

    Returns:
        This process's :class:`DistEnv`.

    Raises:
        LaunchEnvError: see :func:`discover`.
    """
    environ = os.environ if environ is None else environ
    cuda = use_cuda()
    initialized = torch.distributed.is_initialized()
    if initialized:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        local = environ.get("LOCAL_RANK", "")
        # why: a caller-made group (the tests' spawned pools) is one host; rank is the local rank
        local_rank = int(local) if local.isdigit() else rank
        env = DistEnv(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            master_addr=None,
            master_port=None,
            device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
            source="already-initialized",
        )
    else:
        env = discover(environ, cuda=cuda)
        if env.master_port == 0:
            env = dataclasses.replace(env, master_port=free_port())
    if cuda:
        torch.cuda.set_device(env.device)
    if not initialized:
        timeout = set_collective_timeout(timeout_s) if timeout_s is not None else None
        torch.distributed.init_process_group(
            env.backend,
            init_method=env.init_method,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    deepspeed = import_deepspeed()
    # why: with a default group in place, DeepSpeed 0.19's init_distributed only wraps it
    # (comm.py: "The user initialized torch.dist themselves"); the RANK/WORLD_SIZE it reads on
    # the way have defaults and serve only its oneCCL backend and rank-0 log lines.
    deepspeed.init_distributed(dist_backend=env.backend, verbose=False)
    return env


def set_collective_timeout(timeout_s: float) -> timedelta:
    """Make ``timeout_s`` the timeout of every process group created from now on.

    why: ``init_process_group(timeout=...)`` covers the world group only; ``new_group`` without a
    timeout (ours in ``ParallelState``, DeepSpeed's data/expert/pipeline groups) falls back to
    ``torch.distributed.distributed_c10d.default_pg_timeout`` (or ``default_pg_nccl_timeout``),
    module globals read at each call, so those are set too.

    Backends: gloo honours the timeout on every blocking collective and raises
    ``torch.distributed.DistBackendError`` naming the operation it waited for. NCCL enforces it in
    its watchdog thread: with ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` (torch's default since 2.2,
    kept unless the user sets it) a timed-out collective tears the process down with a
    ``Watchdog caught collective operation timeout`` error naming the op; set
    ``TORCH_NCCL_BLOCKING_WAIT=1`` to have the collective raise in Python instead (slower).

    Args:
        timeout_s: seconds a collective may wait for its peers.

    Returns:
        The timeout, to pass to ``init_process_group``.
    """
    timeout = timedelta(seconds=timeout_s)
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    return timeout


def export_local_rank(env: DistEnv) -> None:
    """Set ``LOCAL_RANK`` in ``os.environ`` when absent; call before building DeepSpeed objects.

    why: DeepSpeed 0.19 reads ``os.environ["LOCAL_RANK"]`` with no argument to pass it instead:
    ``DeepSpeedEngine`` asserts it is set and reads it (``runtime/engine.py``,
    ``_do_args_sanity_check`` / ``_configure_with_arguments``), ``PipelineModule`` calls
    ``int(os.environ.get("LOCAL_RANK"))``, and ZeRO-3 reads it at every step
    (``runtime/zero/utils.py``). It reads no other rank variable once a process group exists, so
    this one variable, set for the life of the process, is all that single-process runs and
    caller-made groups need. A launcher's own value is never replaced.

    Args:
        env: this process's :class:`DistEnv` (from :func:`init_distributed`).
    """
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))


def collective_failure(exc: BaseException, rank: int, timeout_s: float | None) -> str | None:
    """One line for a collective that timed out or lost a peer; None for any other error.

    The operation is the innermost ``torch.distributed`` collective in the traceback (gloo's own
    text only says ``recv operation``).

    Args:
        exc: the exception raised out of a step.
        rank: this process's global rank.
        timeout_s: the collective timeout in force (``training.collective_timeout_s``).

    Returns:
        e.g. ``rank 1: a collective (all_reduce) timed out after 30 s: another rank is stalled
        or dead (training.collective_timeout_s)``.
    """
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    op = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith("distributed_c10d.py"):
            op = tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    what = f"a collective ({op})" if op else "a collective"
    if "timed out" in text.lower() or "timeout" in text.lower():
        after = f" after {timeout_s:g} s" if timeout_s is not None else ""
        return (
            f"rank {rank}: {what} timed out{after}: another rank is stalled or dead "
            "(training.collective_timeout_s)"
        )
    if "closed by peer" in text or "Connection reset" in text or "Broken pipe" in text:
        return f"rank {rank}: {what} failed: another rank died; see its output above"
    return None
