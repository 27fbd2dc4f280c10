"""A one-node Slurm cluster on this machine, for trying the Slurm launcher and for the tests.

    python tools/slurm/local_cluster.py start DIR   # prints `export SLURM_CONF=DIR/slurm.conf`
    python tools/slurm/local_cluster.py stop DIR

Needs Debian/Ubuntu's ``slurm-wlm`` and ``munge`` (``apt-get install slurm-wlm munge``) and root
(the daemons run as root, munged as user ``munge``). ``start`` writes ``DIR/slurm.conf`` (one node,
this host, its CPU count and memory from ``slurmd -C``; one partition ``debug``; free ports), starts
``munged`` (unless one answers), ``slurmctld`` and ``slurmd`` in sessions of their own, and waits until
``sinfo`` shows the node idle. Every Slurm command run with ``SLURM_CONF=DIR/slurm.conf`` then talks
to it: ``sbatch --wait``, ``salloc``, ``srun``. ``stop`` ends the daemons it started (their pids are
in ``DIR``). The set-up follows shared/notes/cpu-feasibility.md ("A real Slurm on one machine").
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")
_STARTED: dict[str, subprocess.Popen] = {}
"""The daemons this process started, by pid file: ``stop`` waits for them (no zombie whose
number a new process could take)."""
REQUIRED = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "sinfo", "scontrol")


class ClusterError(RuntimeError):
    """The local cluster cannot be started (the message names what is missing)."""


def missing_programs() -> list[str]:
    """The Slurm/munge programs not found on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return [p for p in REQUIRED if shutil.which(p, path=path) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line(host: str) -> str:
    """``NodeName=...`` for this host from ``slurmd -C`` (CPUs, sockets, memory)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    words = out.splitlines()[0].split()
    fields = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("NodeName="))
    mem = int(fields.pop("RealMemory", "2000"))
    fields["RealMemory"] = str(max(1000, int(mem * 0.9)))
    return " ".join(
        [f"NodeName={host}", "NodeAddr=127.0.0.1", *(f"{k}={v}" for k, v in fields.items())]
    )


def write_conf(folder: Path) -> Path:
    """Write ``folder/slurm.conf`` for a one-node cluster of this host; returns its path."""
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    lines = [
        "ClusterName=local",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        "ReturnToService=2",
        "KillWait=10",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        _node_line(host) + " State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP "
        "OverSubscribe=FORCE:4",
    ]
    conf = folder / "slurm.conf"
    tmp = conf.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(conf)
    return conf


def _munge_answers() -> bool:
    probe = subprocess.run(
        "munge -n | unmunge", shell=True, capture_output=True, text=True, check=False
    )
    return probe.returncode == 0


def _start_munge() -> None:
    if _munge_answers():
        return
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    for _ in range(50):
        if _munge_answers():
            return
        time.sleep(0.1)
    raise ClusterError("munged started but `munge -n | unmunge` fails (see /var/log/munge)")


def _idle(env: dict[str, str]) -> bool:
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, check=False
    )
    return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")


def start(folder: Path, timeout_s: float = 60.0) -> Path:
    """Start munged, slurmctld and slurmd for a one-node cluster in ``folder``.

    Returns:
        The ``slurm.conf`` path (export it as ``SLURM_CONF``).

    Raises:
        ClusterError: a program is missing, this is not root, or the node never turns idle.
    """
    missing = missing_programs()
    if missing:
        raise ClusterError(
            f"missing {', '.join(missing)}: install Debian's slurm-wlm and munge "
            "(apt-get install slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        raise ClusterError("the local Slurm daemons run as root (SlurmUser=root): run as root")
    folder = folder.resolve()
    conf = write_conf(folder)
    _start_munge()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    log = open(folder / "log" / "daemons.out", "ab")  # noqa: SIM115 - the daemons keep it
    for daemon, args in (("slurmctld", ["-D", "-i"]), ("slurmd", ["-D"])):
        proc = subprocess.Popen(
            [daemon, *args, "-f", str(conf)],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        marker = folder / f"{daemon}.started"
        marker.write_text(str(proc.pid))
        _STARTED[str(marker)] = proc
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _idle(env):
            return conf
        time.sleep(0.5)
    stop(folder)
    raise ClusterError(
        f"the local Slurm node did not turn idle in {timeout_s:g} s; see {folder / 'log'}"
    )


def _is_daemon(pid: int, daemon: str) -> bool:
    """Whether ``pid`` still runs ``daemon`` (a pid read from a file may have been reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return daemon in f.read().decode(errors="replace")
    except OSError:
        return False


def stop(folder: Path) -> None:
    """End the daemons :func:`start` started in ``folder`` (munged is left running).

    A daemon this process started is terminated and waited for (SIGKILL after 10 s); one started
    by another process (``local_cluster.py stop``) is signalled only while its pid still runs it.
    """
    for daemon in DAEMONS:
        marker = Path(folder) / f"{daemon}.started"
        if not marker.exists():
            continue
        proc = _STARTED.pop(str(marker), None)
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        else:
            try:
                pid = int(marker.read_text())
            except ValueError:
                pid = 0
            for _ in range(100):
                if not pid or not _is_daemon(pid, daemon):
                    break
                os.kill(pid, signal.SIGTERM if _ == 0 else 0)
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        marker.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("dir", type=Path, help="folder for slurm.conf, state, spool and logs")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            conf = start(args.dir)
            print(f"export SLURM_CONF={conf}")
        else:
            stop(args.dir)
    except (ClusterError, subprocess.CalledProcessError) as e:
        print(f"local_cluster.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
