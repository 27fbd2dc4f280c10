"""The command that starts a run's ranks, for each ``launcher.type`` (pure: ``deepy.py`` runs it).

* ``torchrun``: one agent per node (``tools/torchrun.py``); ``rdzv_backend: static`` with a fixed
  ``node_rank``, or ``c10d``: every node runs the same command and joins the rendezvous at
  ``master_addr:master_port`` in any order.
* ``deepspeed``: the DeepSpeed runner, ``--num_gpus`` / ``--num_accelerators`` on one node or a
  ``hostfile`` (``host slots=N``); a hostfile naming only this machine skips the runner's ssh
  check (``--no_ssh_check``, see shared/notes/cpu-feasibility.md).
* ``slurm``: inside an allocation (``SLURM_JOB_ID`` set), ``srun`` one task per rank
  (``--kill-on-bad-exit``: one failed rank ends the step); the ranks read their place from the
  step's variables (:mod:`megatron.training.rank_discovery`). Outside one, :func:`sbatch_script`
  writes the batch job that runs ``deepy.py`` inside the allocation (``deepy.py --sbatch``).
* ``mpirun``: Open MPI (``-np``, ``--map-by ppr:N:node``, ``--hostfile``, ``-x`` for each variable
  the ranks need) or MPICH / Intel MPI's Hydra (``-n``, ``-ppn``, ``-f``); ranks read
  ``OMPI_COMM_WORLD_*`` / ``PMI_*``.

Everything that can be checked before a rank starts is: a ``slurm`` launch outside an allocation,
an allocation smaller than the run, a hostfile that is missing or lists no slots, a missing
``srun`` / ``mpirun``, a multi-node launch with a loopback ``master_addr`` — each a
:class:`LaunchError` of one line.
"""

from __future__ import annotations

import re
import shlex
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = REPO / "tools" / "torchrun.py"
"""torch.distributed.run's agent, ending with one line instead of a traceback when ranks fail."""
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
RANK_ONLY_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
"""Variables that would make ranks started by srun / mpirun read torchrun's contract instead."""


class LaunchError(ValueError):
    """The run cannot be launched as configured (one line: what and how to fix it)."""


@dataclass(frozen=True)
class Launch:
    """What ``deepy.py`` runs.

    Attributes:
        cmd: the launcher's command line.
        env: variables to set for it (on top of ``deepy.py``'s environment).
        unset: variables to remove from it.
        local: every rank runs on this machine (``deepy.py`` may watch and signal them directly).
        relay: the signal that asks the launcher to pass a stop on to every rank (``srun`` and
            Open MPI's ``mpirun`` relay SIGUSR1 to their tasks but end the job on SIGTERM, after
            a grace too short for a large checkpoint); None: ``deepy.py`` signals the ranks.
    """

    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()
    local: bool = True
    relay: int | None = None


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """``[(host, slots)]`` of a hostfile: ``host slots=N`` (DeepSpeed, Open MPI) or ``host:N``
    (MPICH); ``#`` comments and blank lines are skipped; a host without a count has 1 slot.

    Raises:
        LaunchError: the file is missing, a line is malformed (file:line), or no slot is listed.
    """
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"launcher.hostfile: {path} does not exist")
    hosts: list[tuple[str, int]] = []
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+?)(?::(\d+)|\s+slots\s*=\s*(\d+)(?:\s+.*)?|)", line)
        if m is None:
            raise LaunchError(
                f"{path}:{n}: {raw.strip()!r} is not 'host slots=N' or 'host:N' (launcher.hostfile)"
            )
        slots = int(m.group(2) or m.group(3) or 1)
        if slots < 1:
            raise LaunchError(f"{path}:{n}: {m.group(1)} has {slots} slots (launcher.hostfile)")
        hosts.append((m.group(1), slots))
    if not hosts:
        raise LaunchError(f"launcher.hostfile: {path} lists no host with slots")
    return hosts


def in_allocation(environ: Mapping[str, str]) -> bool:
    """Whether this process runs inside a Slurm allocation (a batch script or ``salloc`` shell)."""
    return bool(environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID"))


def _slurm_tasks_per_node(environ: Mapping[str, str]) -> int | None:
    text = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or ""
    m = re.match(r"(\d+)", text)  # "4(x2)" or "4,2": the first node's count
    return int(m.group(1)) if m else None


def nproc_per_node(la: Any, environ: Mapping[str, str], gpus: int) -> int:
    """Ranks per node: ``launcher.nproc_per_node``, else (Slurm allocation) its tasks per node,
    else the GPUs on this machine, else 1."""
    if la.nproc_per_node:
        return la.nproc_per_node
    if la.type == "slurm" and in_allocation(environ):
        tasks = _slurm_tasks_per_node(environ)
        if tasks:
            return tasks
    if la.type == "slurm" and la.gpus_per_node:
        return la.gpus_per_node
    return max(gpus, 1)


def world_size(la: Any, environ: Mapping[str, str], gpus: int) -> int:
    """The number of ranks the launch starts."""
    return nproc_per_node(la, environ, gpus) * la.num_nodes


def _is_local(host: str) -> bool:
    return host in LOCAL_HOSTS or host == socket.gethostname().split(".")[0]


def _needs_address(la: Any, what: str) -> None:
    if la.num_nodes > 1 and la.master_addr in LOCAL_HOSTS:
        raise LaunchError(
            f"launcher.master_addr ({la.master_addr}) must be the address of node 0 that the "
            f"other nodes can reach when launcher.num_nodes is {la.num_nodes} ({what})"
        )


def _torchrun(la: Any, nproc: int, script: str, args: list[str]) -> Launch:
    cmd = [sys.executable, str(TORCHRUN), f"--nproc_per_node={nproc}", f"--nnodes={la.num_nodes}"]
    if la.rdzv_backend == "c10d":
        _needs_address(la, "the c10d rendezvous endpoint")
        cmd += [
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={la.master_addr}:{la.master_port}",
            f"--rdzv_id={la.rdzv_id}",
        ]
    else:
        _needs_address(la, "torchrun's static rendezvous")
        cmd += [
            f"--node_rank={la.node_rank}",
            f"--master_addr={la.master_addr}",
            f"--master_port={la.master_port}",
        ]
    return Launch([*cmd, *la.extra_args, script, *args], local=la.num_nodes == 1)


def _deepspeed(la: Any, nproc: int, gpus: int, script: str, args: list[str]) -> Launch:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    local = True
    if la.hostfile:
        hosts = parse_hostfile(la.hostfile)
        if len(hosts) < la.num_nodes:
            raise LaunchError(
                f"launcher.hostfile: {la.hostfile} lists {len(hosts)} hosts, fewer than "
                f"launcher.num_nodes ({la.num_nodes})"
            )
        local = all(_is_local(h) for h, _ in hosts)
        cmd += ["--hostfile", la.hostfile, "--num_nodes", str(la.num_nodes)]
        if local:
            cmd += ["--no_ssh_check"]  # why: the runner ssh-probes the first host otherwise
    if not la.hostfile or local or la.master_addr not in LOCAL_HOSTS:
        cmd += ["--master_addr", la.master_addr]  # else: the runner takes the first host
    cmd += ["--master_port", str(la.master_port)]
    cmd += ["--num_gpus" if gpus else "--num_accelerators", str(nproc)]
    return Launch([*cmd, *la.extra_args, script, *args], local=local)


def _srun(
    la: Any, nproc: int, environ: Mapping[str, str], script: str, args: list[str], which: Callable
) -> Launch:
    if not in_allocation(environ):
        raise LaunchError(
            "launcher.type is 'slurm' but this is not inside a Slurm allocation (no "
            "SLURM_JOB_ID): add --sbatch to submit a batch job, or run inside salloc / sbatch"
        )
    if which("srun") is None:
        raise LaunchError("launcher.type is 'slurm' but srun is not on PATH")
    nodes = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    if la.num_nodes > nodes:
        raise LaunchError(
            f"launcher.num_nodes ({la.num_nodes}) exceeds the allocation's {nodes} node(s) "
            f"(SLURM_JOB_NUM_NODES); allocate more (sbatch -N {la.num_nodes}) or lower it"
        )
    tasks = nproc * la.num_nodes
    allocated = environ.get("SLURM_NTASKS")
    if allocated and allocated.isdigit() and tasks > int(allocated):
        raise LaunchError(
            f"{tasks} ranks (launcher.num_nodes {la.num_nodes} x nproc_per_node {nproc}) exceed "
            f"the allocation's {allocated} tasks (SLURM_NTASKS)"
        )
    cmd = [
        "srun",
        f"--nodes={la.num_nodes}",
        f"--ntasks={tasks}",
        f"--ntasks-per-node={nproc}",
        "--kill-on-bad-exit=1",
        "--export=ALL",
    ]
    if la.gpus_per_node:
        cmd.append(f"--gpus-per-node={la.gpus_per_node}")
    if la.cpus_per_task:
        cmd.append(f"--cpus-per-task={la.cpus_per_task}")
    env = {"MASTER_PORT": str(la.master_port)}
    if la.master_addr not in LOCAL_HOSTS:
        env["MASTER_ADDR"] = la.master_addr
    unset = RANK_ONLY_VARS + (() if "MASTER_ADDR" in env else ("MASTER_ADDR",))
    return Launch(
        [*cmd, *la.extra_args, sys.executable, script, *args],
        env=env,
        unset=unset,
        local=la.num_nodes == 1,
        relay=signal.SIGUSR1,
    )


def mpi_flavour(version_text: str) -> str:
    """``openmpi`` or ``hydra`` (MPICH, Intel MPI, MVAPICH's mpiexec) from ``mpirun --version``."""
    if "Open MPI" in version_text or "OpenRTE" in version_text:
        return "openmpi"
    if re.search(r"HYDRA|MPICH|Intel\(R\) MPI|MVAPICH", version_text, re.IGNORECASE):
        return "hydra"
    raise LaunchError(
        "launcher.type is 'mpirun' but `mpirun --version` names neither Open MPI nor MPICH / "
        f"Intel MPI (Hydra): {version_text.strip()[:120]!r}"
    )


def _mpirun(la: Any, nproc: int, flavour: str, script: str, args: list[str]) -> Launch:
    tasks = nproc * la.num_nodes
    hosts = parse_hostfile(la.hostfile) if la.hostfile else None
    addr = la.master_addr
    if hosts is not None:
        if len(hosts) < la.num_nodes:
            raise LaunchError(
                f"launcher.hostfile: {la.hostfile} lists {len(hosts)} hosts, fewer than "
                f"launcher.num_nodes ({la.num_nodes})"
            )
        short = [h for h, slots in hosts[: la.num_nodes] if slots < nproc]
        if short:
            raise LaunchError(
                f"launcher.hostfile: {la.hostfile}: {short[0]} has fewer slots than "
                f"launcher.nproc_per_node ({nproc})"
            )
        if addr in LOCAL_HOSTS and not _is_local(hosts[0][0]):
            addr = hosts[0][0]  # mpirun places rank 0 on the hostfile's first host
    elif la.num_nodes > 1:
        raise LaunchError(
            f"launcher.num_nodes is {la.num_nodes}: launcher.type 'mpirun' needs a "
            "launcher.hostfile naming the nodes"
        )
    env = {"MASTER_ADDR": addr, "MASTER_PORT": str(la.master_port)}
    if flavour == "openmpi":
        cmd = ["mpirun", "-np", str(tasks), "--map-by", f"ppr:{nproc}:node", "--bind-to", "none"]
        if la.hostfile:
            cmd += ["--hostfile", la.hostfile]
        for name in (*env, "DS_ACCELERATOR", "OMP_NUM_THREADS", "PATH", "PYTHONPATH"):
            cmd += ["-x", name]  # why: Open MPI passes no variable to other nodes unless named
        cmd += ["-x", "MEGATRON_*"]
    else:  # Hydra passes the whole environment (-genvall is its default)
        cmd = ["mpiexec", "-n", str(tasks), "-ppn", str(nproc)]
        if la.hostfile:
            cmd += ["-f", la.hostfile]
    return Launch(
        [*cmd, *la.extra_args, sys.executable, script, *args],
        env=env,
        unset=RANK_ONLY_VARS,
        local=hosts is None or all(_is_local(h) for h, _ in hosts[: la.num_nodes]),
        relay=signal.SIGUSR1,
    )


def launch_command(
    script: str,
    files: Sequence[str],
    overrides: Sequence[str],
    cfg: Any,
    environ: Mapping[str, str],
    *,
    gpus: int,
    which: Callable[[str], str | None],
    mpi_version: Callable[[], str] | None = None,
) -> Launch:
    """The :class:`Launch` that starts every rank of ``script`` this machine starts.

    Args:
        script: the entry point (``train.py``).
        files: the config files, passed on to every rank.
        overrides: the ``dotted.key=value`` overrides, passed on.
        cfg: the resolved run config (its ``launcher`` section decides).
        environ: ``deepy.py``'s environment (Slurm allocation variables).
        gpus: GPUs on this machine.
        which: ``shutil.which``.
        mpi_version: returns ``mpirun --version``'s output (``mpirun`` only).

    Raises:
        LaunchError: see the module docstring.
    """
    la = cfg.launcher
    nproc = nproc_per_node(la, environ, gpus)
    args = [*files, *overrides]
    if la.type == "deepspeed":
        return _deepspeed(la, nproc, gpus, script, args)
    if la.type == "slurm":
        return _srun(la, nproc, environ, script, args, which)
    if la.type == "mpirun":
        program = which("mpirun") or which("mpiexec")
        if program is None:
            raise LaunchError(
                "launcher.type is 'mpirun' but neither mpirun nor mpiexec is on PATH (install "
                "Open MPI or MPICH, e.g. apt-get install openmpi-bin)"
            )
        flavour = mpi_flavour(mpi_version() if mpi_version else "Open MPI")
        return _mpirun(la, nproc, flavour, script, args)
    return _torchrun(la, nproc, script, args)


def sbatch_script(
    deepy: str,
    script: str,
    files: Sequence[str],
    overrides: Sequence[str],
    cfg: Any,
    *,
    output_dir: str,
    workdir: str,
) -> str:
    """The batch script ``deepy.py --sbatch`` submits: ``#SBATCH`` lines from the ``launcher``
    section, its ``setup`` lines, then ``exec python deepy.py ...`` (the same files, as absolute
    paths, and overrides) inside the allocation, where ``launcher.type: slurm`` runs ``srun``.

    ``exec`` makes ``deepy.py`` the batch shell itself, so Slurm's ``--signal=B:USR1@N`` reaches
    it and it forwards the stop to every rank (they checkpoint before the time limit).
    """
    la = cfg.launcher
    nproc = nproc_per_node(la, {}, gpus=0)  # outside an allocation: the config decides
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={la.job_name}",
        f"#SBATCH --nodes={la.num_nodes}",
        f"#SBATCH --ntasks-per-node={nproc}",
        f"#SBATCH --output={output_dir}/slurm-%j.out",
    ]
    for opt, value in (
        ("partition", la.partition),
        ("account", la.account),
        ("time", la.time),
        ("gpus-per-node", la.gpus_per_node),
        ("cpus-per-task", la.cpus_per_task),
    ):
        if value:
            lines.append(f"#SBATCH --{opt}={value}")
    if la.signal_before_end_s:
        lines.append(f"#SBATCH --signal=B:USR1@{la.signal_before_end_s}")
    lines += [f"#SBATCH {extra}" for extra in la.sbatch_lines]
    lines += ["", "set -eo pipefail", f"cd {shlex.quote(workdir)}", *la.setup]
    argv = [sys.executable, deepy, script, *(str(Path(f).resolve()) for f in files), *overrides]
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"
