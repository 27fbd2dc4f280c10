"""Process-group start-up shared by ``train.py``, tools and tests.

Where a process's rank comes from, in order:

1. ``torch.distributed`` is already initialised (tests, notebooks): its rank and size.
2. ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``, as torchrun,
   the DeepSpeed runner (both started by ``deepy.py``) or a job script export them.
3. Otherwise the process runs alone (world size 1, a free loopback port for the store) — but only
   when no launcher says it started several tasks: a bare ``srun`` (Slurm job step), ``mpirun``
   (Open MPI) or ``mpiexec`` (MPICH / Intel MPI, PMIx) with more than one task is an error, never
   N independent one-process runs.

:func:`discover` is the pure part (a mapping of environment variables in, a :class:`DistEnv` out);
:func:`init_distributed` creates the process group from it with explicit arguments and leaves
``os.environ`` as it found it.

On machines without CUDA, DeepSpeed runs on its CPU accelerator with gloo
(``DS_ACCELERATOR=cpu``), and its shared-memory comm op (a 40-90 s JIT build) is switched off so
gloo does every collective (see shared/notes/cpu-feasibility.md).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed.distributed_c10d as c10d

# The torchrun / DeepSpeed-runner contract (torch.distributed's ``env://``).
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

_LOOPBACK = "127.0.0.1"


class LaunchEnvError(RuntimeError):
    """The launcher's environment does not say which rank this process is."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, and where that was read from.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of processes in the job.
        local_rank: rank on this node (selects the GPU).
        master_addr: host of rank 0's store; None when the caller made the process group.
        master_port: port of that store; None when the caller made the process group.
        device: this rank's device: ``cuda:local_rank``, or ``cpu`` without CUDA.
        source: what the values came from: ``"torchrun"``, ``"deepspeed"`` (its runner),
            ``"env"`` (the variables set by a script), ``"already-initialized"`` or
            ``"single-process"``.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    device: torch.device
    source: str

    @property
    def backend(self) -> str:
        """``nccl`` on CUDA devices, else ``gloo``."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def init_method(self) -> str:
        """``tcp://master_addr:master_port`` (an IPv6 address in brackets)."""
        host = f"[{self.master_addr}]" if ":" in (self.master_addr or "") else self.master_addr
        return f"tcp://{host}:{self.master_port}"


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
        s.bind((_LOOPBACK, 0))
        return s.getsockname()[1]


def _device(local_rank: int, cuda: bool) -> torch.device:
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def _int(environ: Mapping[str, str], name: str, problems: list[str]) -> int | None:
    value = environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        problems.append(f"{name}={value!r} is not an integer")
        return None


def _from_rank_vars(environ: Mapping[str, str], cuda: bool) -> DistEnv:
    """The torchrun contract; a world of 1 may leave out everything but RANK and WORLD_SIZE."""
    problems: list[str] = []
    rank, world = _int(environ, "RANK", problems), _int(environ, "WORLD_SIZE", problems)
    local, port = _int(environ, "LOCAL_RANK", problems), _int(environ, "MASTER_PORT", problems)
    addr = environ.get("MASTER_ADDR") or None
    missing = [n for n in ("RANK", "WORLD_SIZE") if n not in environ]
    if world is not None and world > 1:
        missing += [n for n in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if n not in environ]
    if missing:
        problems.append("missing " + ", ".join(missing))
    if world is not None and world < 1:
        problems.append(f"WORLD_SIZE ({world}) must be >= 1")
    if rank is not None and world is not None and not 0 <= rank < world:
        problems.append(f"RANK ({rank}) must be in [0, WORLD_SIZE={world})")
    if local is not None and local < 0:
        problems.append(f"LOCAL_RANK ({local}) must be >= 0")
    if port is not None and not 0 < port < 65536:
        problems.append(f"MASTER_PORT ({port}) must be in [1, 65535]")
    if problems:
        shown = " ".join(f"{n}={environ[n]}" for n in RANK_VARS if n in environ)
        raise LaunchEnvError(
            f"incomplete launcher environment ({shown}): " + "; ".join(problems) + ". torchrun "
            "and `python deepy.py` set all of " + ", ".join(RANK_VARS) + "."
        )
    assert rank is not None and world is not None  # guaranteed by the checks above
    if "TORCHELASTIC_RUN_ID" in environ:
        source = "torchrun"
    elif "CROSS_RANK" in environ:  # deepspeed.launcher.launch sets CROSS_RANK / CROSS_SIZE
        source = "deepspeed"
    else:
        source = "env"
    local = 0 if local is None else local
    if port is None:  # a world of 1 without a store address: its own, on loopback
        addr, port = _LOOPBACK, 0  # 0: init_distributed picks a free port
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=local,
        master_addr=addr or _LOOPBACK,
        master_port=port,
        device=_device(local, cuda),
        source=source,
    )


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        if environ.get(name, "") != "":
            return name, environ[name]
    return None


# (launcher, one of these must be set for it to count, task-count variables, rank variables)
_LAUNCHERS = (
    (
        "Slurm (srun)",
        ("SLURM_STEP_ID", "SLURM_STEPID"),
        ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
        ("SLURM_PROCID",),
    ),
    ("Open MPI (mpirun)", (), ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_RANK",)),
    ("MPICH / Intel MPI (mpiexec)", (), ("PMI_SIZE",), ("PMI_RANK",)),
    ("PMIx", (), ("PMIX_SIZE",), ("PMIX_RANK",)),
)


def launcher_tasks(environ: Mapping[str, str]) -> tuple[str, int, str] | None:
    """A launcher that started several tasks without torchrun's variables, if any.

    Slurm counts only inside a job step (``SLURM_STEP_ID`` is set by ``srun``, not in the batch
    script or an ``salloc`` shell, where one process is the right reading). A PMI/PMIx rank > 0
    says there are several tasks even when no size variable is exported.

    Args:
        environ: the environment variables to read.

    Returns:
        ``(launcher, tasks, evidence)`` (``tasks`` a lower bound when only a rank is known; the
        evidence names the variables), or None when no launcher reports more than one task.
    """
    for launcher, step_vars, size_vars, rank_vars in _LAUNCHERS:
        if step_vars and _first(environ, *step_vars) is None:
            continue
        size, rank = _first(environ, *size_vars), _first(environ, *rank_vars)
        try:
            tasks = int(size[1]) if size else 0
            if rank:
                tasks = max(tasks, int(rank[1]) + 1)
        except ValueError:
            tasks = 0  # not a count we can read: not evidence of several tasks
        if tasks > 1:
            evidence = " ".join(f"{p[0]}={p[1]}" for p in (size, rank) if p)
            return launcher, tasks, evidence
    return None


def discover(environ: Mapping[str, str], *, cuda: bool | None = None) -> DistEnv:
    """Read this process's place in the job from environment variables (no side effects).

    Args:
        environ: the variables to read (``os.environ`` in a real launch).
        cuda: whether the device is a GPU; default: ``torch.cuda.is_available()``.

    Returns:
        The :class:`DistEnv`. For a single process ``master_port`` is 0:
        :func:`init_distributed` picks a free one.

    Raises:
        LaunchEnvError: torchrun's variables are incomplete or inconsistent, or a launcher
            started several tasks without them (its own rank discovery is not wired yet).
    """
    cuda = use_cuda() if cuda is None else cuda
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _from_rank_vars(environ, cuda)
    several = launcher_tasks(environ)
    if several is not None:
        launcher, _, evidence = several
        raise LaunchEnvError(
            f"{launcher} started several tasks ({evidence}) but set no "
            "RANK/WORLD_SIZE: rank discovery from this launcher's variables is not wired yet "
            "(the cluster-launch issue adds it), and running each task as its own one-process "
            "job would train the same model several times. Launch with `python deepy.py "
            "CONFIG.yml ...` or `torchrun --nproc_per_node N train.py CONFIG.yml ...` (one "
            "torchrun per node), or export " + ", ".join(RANK_VARS) + " yourself "
            "(e.g. RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID)."
        )
    return DistEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        # why: a one-process group meets nobody, so it binds its own loopback port; any
        # MASTER_ADDR/MASTER_PORT in the environment are meant for other processes.
        master_addr=_LOOPBACK,
        master_port=0,
        device=_device(0, cuda),
        source="single-process",
    )


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
            device=_device(local_rank, cuda),
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
