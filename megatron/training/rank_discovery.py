"""Rank discovery for every launcher, in one place: which rank this process is, and where rank 0's
store listens.

Sources, in the order they are read (the first that applies decides):

1. ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``: torchrun, the
   DeepSpeed runner, a job script that exports them (``source`` ``torchrun``/``deepspeed``/``env``).
2. Open MPI's ``mpirun``: ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}`` (``openmpi``).
3. MVAPICH2: ``MV2_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}`` (``mvapich``).
4. MPICH / Intel MPI (Hydra's ``mpiexec``): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``,
   ``MPI_LOCALNRANKS`` (``mpich``) — unless a Slurm job step of the same size set them (``srun
   --mpi=pmi2``), which is read as Slurm.
5. A Slurm job step (``srun``): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``),
   ``SLURM_LOCALID``, ``SLURM_NODEID``, and rank 0's host as the first of
   ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` (:func:`expand_hostlist` reads Slurm's
   compressed form, e.g. ``gpu-[07-08,11]``) (``slurm``). A batch script or an ``salloc`` shell is
   not a step: one process.
6. PMIx alone (``PMIX_RANK``, e.g. ``srun --mpi=pmix`` or ``prterun``): the sizes come from mpi4py.

Where a launcher does not give everything, mpi4py (the ``mpi`` extra), when installed, fills in the
rest: the world size, the local rank (``Split_type(COMM_TYPE_SHARED)``) and rank 0's address
(broadcast). ``MASTER_ADDR`` / ``MASTER_PORT`` in the environment always win. Without them, a job
on one node uses the loopback address, and the port is derived from the job's id
(:func:`job_port`), the same on every rank. Partial or contradictory variables — a rank without a
size, a rank outside the world, a local rank outside its node, two launchers that disagree — raise
:class:`LaunchEnvError`; no combination silently becomes a one-process run.

GPT-NeoX reads the same variables in ``deepy``'s DeepSpeed launchers (OpenMPI, MVAPICH, Slurm,
jsrun); the variable names are the launchers' documented ones (Slurm ``srun(1)`` "OUTPUT
ENVIRONMENT VARIABLES", Open MPI ``mpirun(1)``, MPICH Hydra, MVAPICH2 user guide).
"""

from __future__ import annotations

import re
import socket
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

# The torchrun / DeepSpeed-runner contract (torch.distributed's ``env://``).
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 29500
PORT_RANGE = (20000, 60000)
"""Ports derived from a job id fall in ``[20000, 60000)`` (below Linux's ephemeral range)."""


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
        master_port: port of that store (0: pick a free one, for a world of one); None when the
            caller made the process group.
        device: this rank's device: ``cuda:local_rank``, or ``cpu`` without CUDA.
        source: what the values came from: ``torchrun``, ``deepspeed`` (its runner), ``env``
            (variables set by a script), ``slurm``, ``openmpi``, ``mpich``, ``mvapich``,
            ``pmix``, ``already-initialized`` or ``single-process``.
        node_rank: index of this process's node (0 where the launcher does not say).
        local_world_size: processes on this node (1 where the launcher does not say).
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    device: torch.device
    source: str
    node_rank: int = 0
    local_world_size: int = 1

    @property
    def backend(self) -> str:
        """``nccl`` on CUDA devices, else ``gloo``."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def init_method(self) -> str:
        """``tcp://master_addr:master_port`` (an IPv6 address in brackets)."""
        host = f"[{self.master_addr}]" if ":" in (self.master_addr or "") else self.master_addr
        return f"tcp://{host}:{self.master_port}"

    def describe(self) -> str:
        """One line for the start-up log, e.g. ``8 ranks from slurm (2 nodes x 4), store
        gpu-07:29500``."""
        nodes = self.world_size // max(self.local_world_size, 1)
        shape = f" ({nodes} nodes x {self.local_world_size})" if nodes > 1 else ""
        store = f", store {self.master_addr}:{self.master_port}" if self.master_addr else ""
        return f"{self.world_size} ranks from {self.source}{shape}{store}"


# ---- Slurm's compressed host lists -----------------------------------------------------------
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_one(name: str, expr: str) -> list[str]:
    open_at = name.find("[")
    if open_at < 0:
        return [name]
    close_at = name.find("]", open_at)
    if close_at < 0:
        raise LaunchEnvError(f"host list {expr!r}: '[' without ']' in {name!r}")
    head, body, tail = name[:open_at], name[open_at + 1 : close_at], name[close_at + 1 :]
    out: list[str] = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if m is None:
            raise LaunchEnvError(f"host list {expr!r}: {item!r} is not a number or a range a-b")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo) if lo.startswith("0") else 0  # Slurm keeps the zero padding
        if int(hi) < int(lo):
            raise LaunchEnvError(f"host list {expr!r}: range {item!r} runs backwards")
        for n in range(int(lo), int(hi) + 1):
            out.extend(_expand_one(f"{head}{n:0{width}d}{tail}", expr))
    return out


def expand_hostlist(expr: str) -> list[str]:
    """Slurm's compressed host list as host names, in order (``scontrol show hostnames``).

    ``gpu-[07-08,11],cpu1`` -> ``gpu-07 gpu-08 gpu-11 cpu1``; several bracket groups in one name
    expand left to right (``r[1-2]n[1-2]`` -> ``r1n1 r1n2 r2n1 r2n2``).

    Raises:
        LaunchEnvError: the expression is malformed.
    """
    if expr.count("[") != expr.count("]"):
        raise LaunchEnvError(f"host list {expr!r}: unbalanced brackets")
    hosts: list[str] = []
    for name in _split_top(expr.strip()):
        hosts.extend(_expand_one(name, expr))
    return hosts


def job_port(job_id: str) -> int:
    """A port every rank of a job derives alike from the job's id, in :data:`PORT_RANGE`."""
    lo, hi = PORT_RANGE
    return lo + zlib.crc32(job_id.encode()) % (hi - lo)


# ---- reading variables -------------------------------------------------------------------------
class _Reader:
    """Collects integer variables and the problems found reading them."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def first(self, *names: str) -> tuple[str, str] | None:
        for name in names:
            if self.environ.get(name, "") != "":
                return name, self.environ[name]
        return None

    def int(self, *names: str) -> int | None:
        found = self.first(*names)
        if found is None:
            return None
        try:
            return int(found[1])
        except ValueError:
            self.problems.append(f"{found[0]}={found[1]!r} is not an integer")
            return None

    def shown(self, prefixes: tuple[str, ...]) -> str:
        names = sorted(n for n in self.environ if n.startswith(prefixes))
        return " ".join(f"{n}={self.environ[n]}" for n in names)


@dataclass(frozen=True)
class _Found:
    """What one launcher's variables say (None: not said)."""

    source: str
    rank: int | None
    world: int | None
    local: int | None
    local_size: int | None
    node: int | None = None
    nodes: int | None = None
    addr: str | None = None
    job_id: str | None = None
    evidence: str = ""


MpiQuery = Callable[[], dict]
"""Returns ``{"rank", "world", "local", "local_size", "addr"}`` from mpi4py (collective)."""


def mpi4py_query() -> dict:
    """This process's place from mpi4py's ``COMM_WORLD`` (every rank must call it).

    Raises:
        ImportError: mpi4py is not installed.
    """
    # why: importing mpi4py.MPI initialises MPI; done only when an MPI launcher started us
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        addr = host
    addr = world.bcast(addr, root=0)
    out = {
        "rank": world.Get_rank(),
        "world": world.Get_size(),
        "local": local.Get_rank(),
        "local_size": local.Get_size(),
        "addr": addr,
    }
    local.Free()
    return out


def _slurm(r: _Reader) -> _Found | None:
    if r.first("SLURM_STEP_ID", "SLURM_STEPID") is None or r.first("SLURM_PROCID") is None:
        return None
    nodelist = r.first("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    addr = None
    if nodelist is not None:
        try:
            addr = expand_hostlist(nodelist[1])[0]
        except (LaunchEnvError, IndexError) as e:
            r.problems.append(f"{nodelist[0]}: {e}")
    job = r.first("SLURM_JOB_ID", "SLURM_JOBID")
    step = r.first("SLURM_STEP_ID", "SLURM_STEPID")
    return _Found(
        "slurm",
        r.int("SLURM_PROCID"),
        r.int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
        r.int("SLURM_LOCALID"),
        None,
        node=r.int("SLURM_NODEID"),
        nodes=r.int("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"),
        addr=addr,
        job_id=f"slurm-{job[1]}.{step[1]}" if job and step else None,
        evidence=r.shown(("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_LOCALID")),
    )


def _mpi(r: _Reader, source: str, prefix: str, local: str, local_size: str) -> _Found | None:
    if r.first(f"{prefix}RANK", f"{prefix}SIZE") is None:
        return None
    job = r.first("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE", "PMI_KVSNAME", "MPIRUN_ID")
    return _Found(
        source,
        r.int(f"{prefix}RANK"),
        r.int(f"{prefix}SIZE"),
        r.int(local),
        r.int(local_size),
        job_id=f"{source}-{job[1]}" if job else None,
        evidence=r.shown((prefix, local, local_size)),
    )


def _pmix(r: _Reader) -> _Found | None:
    if r.first("PMIX_RANK") is None:
        return None
    job = r.first("PMIX_NAMESPACE")
    return _Found(
        "pmix",
        r.int("PMIX_RANK"),
        r.int("PMIX_SIZE"),
        None,
        None,
        job_id=f"pmix-{job[1]}" if job else None,
        evidence=r.shown(("PMIX_RANK", "PMIX_SIZE")),
    )


def _launcher(r: _Reader) -> _Found | None:
    """The launcher whose variables decide (see the module docstring for the order)."""
    slurm = _slurm(r)
    for found in (
        _mpi(r, "openmpi", "OMPI_COMM_WORLD_", "OMPI_COMM_WORLD_LOCAL_RANK",
             "OMPI_COMM_WORLD_LOCAL_SIZE"),
        _mpi(r, "mvapich", "MV2_COMM_WORLD_", "MV2_COMM_WORLD_LOCAL_RANK",
             "MV2_COMM_WORLD_LOCAL_SIZE"),
    ):  # fmt: skip
        if found is not None:  # inside a Slurm step its daemons were the step's tasks
            return _in_allocation(found, slurm)
    hydra = _mpi(r, "mpich", "PMI_", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    if hydra is not None:
        if slurm is None or slurm.world != hydra.world:
            return _in_allocation(hydra, slurm)  # Hydra's mpiexec (proxies: a step of their own)
        if hydra.rank is not None and hydra.rank != slurm.rank:  # srun --mpi=pmi2 agrees
            r.problems.append(
                f"Slurm and PMI disagree on this rank: SLURM_PROCID={slurm.rank}, "
                f"PMI_RANK={hydra.rank} in a step of {slurm.world} tasks"
            )
        return slurm
    return slurm or _pmix(r)


def _in_allocation(found: _Found, slurm: _Found | None) -> _Found:
    """An MPI launcher inside a Slurm allocation: rank 0 runs on the allocation's first node
    (mpirun and mpiexec fill the allocation's nodes in order)."""
    return found if slurm is None or slurm.addr is None else replace(found, addr=slurm.addr)


def _check(f: _Found, r: _Reader, final: bool) -> None:
    """Add what contradicts itself to ``r.problems``; ``final``: also what is still missing."""
    p = r.problems
    if final and f.rank is None:
        p.append(f"{f.source}: no rank variable")
    if final and f.world is None:
        p.append(f"{f.source}: no world size variable")
    if f.rank is not None and f.world is not None:
        if f.world < 1:
            p.append(f"world size ({f.world}) must be >= 1")
        elif not 0 <= f.rank < f.world:
            p.append(f"rank ({f.rank}) must be in [0, world size={f.world})")
    if f.local is not None and f.local < 0:
        p.append(f"local rank ({f.local}) must be >= 0")
    if f.local_size is not None:
        if f.local is not None and f.local >= f.local_size:
            p.append(f"local rank ({f.local}) must be < local size ({f.local_size})")
        if f.world is not None and f.local_size > f.world:
            p.append(f"local size ({f.local_size}) exceeds the world size ({f.world})")
    if f.node is not None and f.nodes is not None and not 0 <= f.node < f.nodes:
        p.append(f"node id ({f.node}) must be in [0, nodes={f.nodes})")
    if final and f.world is not None and f.world > 1 and f.local is None:
        p.append(f"{f.source}: no local rank variable")


def _install_mpi(what: str) -> str:
    return f"{what}; install mpi4py (pip install -e '.[mpi]') to read it from MPI"


def discover(
    environ: Mapping[str, str], *, cuda: bool | None = None, mpi: MpiQuery | None = None
) -> DistEnv:
    """Read this process's place in the job (see the module docstring for the sources).

    Args:
        environ: the variables to read (``os.environ`` in a real launch).
        cuda: whether the device is a GPU; default: ``torch.cuda.is_available()``.
        mpi: asked for what an MPI launcher's variables leave out (a collective: every rank of
            the job asks together); default :func:`mpi4py_query` (ImportError: not installed).
            Never called for torchrun's variables or a complete Slurm step.

    Returns:
        The :class:`DistEnv`. For a world of one ``master_port`` is 0 (pick a free one).

    Raises:
        LaunchEnvError: the variables are partial or contradictory, naming them and the fix.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _from_rank_vars(environ, cuda)
    r = _Reader(environ)
    found = _launcher(r)
    if found is None:
        return DistEnv(0, 1, 0, LOOPBACK, 0, _device(0, cuda), "single-process")
    multi_node = (
        found.local_size is not None
        and found.world is not None
        and (found.local_size < found.world)
    )
    no_address = "MASTER_ADDR" not in environ and found.addr is None
    needs_mpi = found.source != "slurm" and (
        found.world is None
        or (found.local is None and (found.world or 2) > 1)
        or (multi_node and no_address)
        # how many nodes is unknown: only MPI can say whether the loopback address will do
        or (found.local_size is None and (found.world or 2) > 1 and no_address)
    )
    _check(found, r, final=False)
    if needs_mpi and not r.problems:
        query = mpi4py_query if mpi is None else mpi
        try:
            got = query()
        except ImportError:
            missing = (
                "world size"
                if found.world is None
                else ("local rank" if found.local is None else "rank 0's host")
            )
            raise LaunchEnvError(
                f"{found.source} started this process ({found.evidence or 'no size'}) without "
                + _install_mpi(f"its {missing}")
                + (", or export MASTER_ADDR=<rank 0's host> (mpirun -x MASTER_ADDR)"
                   if missing.startswith("rank 0") else "")
            ) from None  # fmt: skip
        if found.rank is not None and got["rank"] != found.rank:
            r.problems.append(f"mpi4py's rank ({got['rank']}) differs from {found.evidence}")
        found = replace(
            found,
            rank=got["rank"],
            world=got["world"],
            local=got["local"] if found.local is None else found.local,
            local_size=got["local_size"] if found.local_size is None else found.local_size,
            addr=found.addr or got["addr"],
        )
    if not r.problems:  # else they were found before asking MPI; the same checks would repeat them
        _check(found, r, final=True)
    if r.problems:
        raise LaunchEnvError(
            f"contradictory or partial {found.source} environment ({found.evidence}): "
            + "; ".join(r.problems)
            + ". Launch with `python deepy.py train.py CONFIG.yml` (any launcher.type), or "
            "export " + ", ".join(RANK_VARS) + " yourself."
        )
    assert found.rank is not None and found.world is not None  # checked above
    return _assemble(found, environ, cuda)


def _assemble(f: _Found, environ: Mapping[str, str], cuda: bool) -> DistEnv:
    world, local = f.world or 1, f.local or 0
    local_size = f.local_size
    if local_size is None and f.nodes:
        local_size = -(-world // f.nodes)
    local_size = local_size or world
    if f.node is not None:
        node = f.node
    elif local_size and (f.rank - local) % local_size == 0:
        node = (f.rank - local) // local_size  # block placement (mpirun's default --map-by slot)
    else:
        node = 0
    if world == 1:  # meets nobody: its own loopback store, whatever the environment says
        addr, port = LOOPBACK, 0
    else:
        single_node = local_size >= world or f.nodes == 1
        addr = environ.get("MASTER_ADDR") or (LOOPBACK if single_node else f.addr)
        if addr is None:
            raise LaunchEnvError(
                f"{f.source}: several nodes and no address for rank 0's store: export "
                "MASTER_ADDR=<host of rank 0> (mpirun -x MASTER_ADDR=...) or install mpi4py"
            )
        port_text = environ.get("MASTER_PORT", "")
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise LaunchEnvError(f"MASTER_PORT={port_text!r} must be a port in [1, 65535]")
            port = int(port_text)
        else:
            port = job_port(f.job_id) if f.job_id else DEFAULT_PORT
    return DistEnv(
        rank=f.rank,
        world_size=world,
        local_rank=local,
        master_addr=addr,
        master_port=port,
        device=_device(local, cuda),
        source=f.source,
        node_rank=node,
        local_world_size=local_size,
    )


def _device(local_rank: int, cuda: bool) -> torch.device:
    return torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def _from_rank_vars(environ: Mapping[str, str], cuda: bool) -> DistEnv:
    """The torchrun contract; a world of 1 may leave out everything but RANK and WORLD_SIZE."""
    r = _Reader(environ)
    problems = r.problems
    rank, world = r.int("RANK"), r.int("WORLD_SIZE")
    local, port = r.int("LOCAL_RANK"), r.int("MASTER_PORT")
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
        addr, port = LOOPBACK, 0  # 0: init_distributed picks a free port
    node = r.int("GROUP_RANK", "CROSS_RANK") or 0
    local_size = r.int("LOCAL_WORLD_SIZE", "LOCAL_SIZE") or 1
    return DistEnv(
        rank=rank,
        world_size=world,
        local_rank=local,
        master_addr=addr or LOOPBACK,
        master_port=port,
        device=_device(local, cuda),
        source=source,
        node_rank=node,
        local_world_size=local_size,
    )
