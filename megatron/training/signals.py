"""Stopping a run cleanly: signals become a checkpoint at a step boundary; no orphaned ranks.

What each process does:

* ``deepy.py`` forwards SIGTERM / SIGINT to the ranks and waits for them; the launcher it starts
  (torchrun or the DeepSpeed runner) gets :func:`set_parent_death_signal` so that even a SIGKILL
  of ``deepy.py`` reaches it as a SIGTERM.
* Every rank (``train.py``) calls :func:`install`: SIGTERM, SIGINT and SIGUSR1 (Slurm's
  ``--signal=USR1@N`` pre-emption warning) only set a flag; the rank itself gets a parent-death
  signal, so it stops when its launcher dies, and it watches ``deepy.py`` (its pid is exported as
  :data:`LAUNCHER_PID_ENV`), so it also stops when a launcher in between (the DeepSpeed runner
  has no parent-death signal of its own) is left behind.
* At the end of every step the trainer calls :func:`stop_agreed`: an all-reduce (MAX) of the flag
  over the world group, so all ranks stop after the *same* step even when only one of them was
  signalled. The trainer then saves (when ``checkpoint.save`` is set) and ``train.py`` exits 0
  with :func:`preempted_message`.
* A second signal more than :data:`REPEAT_WINDOW_S` after the first exits at once, without
  saving (exit status 128 + signal). Closer repeats are the same stop: Slurm signals every
  process of a job step and torchrun forwards the signal again, so each rank commonly sees two
  SIGTERMs within milliseconds.

The parent-death signal is Linux's ``prctl(PR_SET_PDEATHSIG)``. Elsewhere (macOS, or a libc that
cannot be loaded) :func:`install` falls back to a daemon thread that polls ``os.getppid()`` every
:data:`WATCHDOG_INTERVAL_S`. Either way, a dead parent or ``deepy.py`` counts as a SIGTERM.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""Signals that ask a rank to checkpoint and stop at the end of its current step."""

REPEAT_WINDOW_S = 2.0
"""A repeat of a stop signal within this many seconds of the first is ignored (see above)."""

WATCHDOG_INTERVAL_S = 1.0
"""Polling period of the watchdog thread (parent, and ``deepy.py``)."""

LAUNCHER_PID_ENV = "MEGATRON_LAUNCHER_PID"
"""Environment variable through which ``deepy.py`` tells the ranks its pid."""
EXIT_DIR_ENV = "MEGATRON_EXIT_DIR"
"""Directory (made by ``deepy.py``) where each rank leaves a non-zero exit status, so that
``deepy.py`` exits with the ranks' status (e.g. 3 for divergence) rather than the launcher's
generic 1."""
PREFLIGHT_ENV = "MEGATRON_PREFLIGHT_DONE"
"""Set by ``deepy.py`` for the ranks it launches: it has checked the run's files (and hashed the
checkpoint) already."""


def record_exit_status(code: int, environ: dict[str, str] | None = None) -> None:
    """Leave this rank's non-zero exit status in ``$MEGATRON_EXIT_DIR/rank<RANK>`` (if set)."""
    env = os.environ if environ is None else environ
    folder = env.get(EXIT_DIR_ENV)
    if not code or not folder or not os.path.isdir(folder):
        return
    names = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
    rank = next((env[n] for n in names if env.get(n)), "0")
    with open(os.path.join(folder, f"rank{rank}"), "w") as f:
        f.write(str(int(code)))


def recorded_exit_statuses(folder: str) -> dict[str, int]:
    """``{rank file: status}`` left by :func:`record_exit_status` in ``folder``."""
    out = {}
    for name in sorted(os.listdir(folder)):
        try:
            with open(os.path.join(folder, name)) as f:
                out[name] = int(f.read().strip())
        except (OSError, ValueError):
            continue
    return out


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_received: dict[str, float | int | None] = {"signum": None, "at": None}


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent thread exits.

    Usable as ``subprocess.Popen(preexec_fn=...)`` (it runs in the child between fork and exec,
    and the setting survives exec). Linux only.

    Args:
        signum: the signal to receive.

    Returns:
        Whether the kernel accepted it (False off Linux or without a loadable libc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _watch(parent: int | None, launcher: int | None) -> None:
    while (parent is None or os.getppid() == parent) and (launcher is None or _alive(launcher)):
        time.sleep(WATCHDOG_INTERVAL_S)
    if _received["signum"] is None:  # a stop, never the "second signal" that exits at once
        _received.update(signum=int(signal.SIGTERM), at=time.monotonic())


def _handler(signum: int, frame: object) -> None:
    now = time.monotonic()
    first_at = _received["at"]
    if first_at is None:
        _received.update(signum=signum, at=now)
        return
    if now - first_at < REPEAT_WINDOW_S:
        return  # the same stop, delivered twice (see the module docstring)
    name = signal.Signals(signum).name
    rank = os.environ.get("RANK", "0")
    # why: os.write, not logging: a handler may interrupt the main thread inside a log call
    os.write(2, f"rank {rank}: second {name}: exiting now without saving\n".encode())
    os._exit(128 + signum)


def install(parent_pid: int | None = None) -> None:
    """Turn the stop signals into a flag and stop with the parent (call once, main thread).

    Args:
        parent_pid: the parent this process was started by (read ``os.getppid()`` as early as
            possible); if it has already changed, the parent died before the death signal was
            set, and the process stops at its first step boundary.
    """
    parent = os.getppid() if parent_pid is None else parent_pid
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handler)
    watch_parent = None if set_parent_death_signal(signal.SIGTERM) else parent
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    watch_launcher = int(launcher) if launcher.isdigit() else None
    if watch_parent is not None or watch_launcher is not None:
        threading.Thread(target=_watch, args=(watch_parent, watch_launcher), daemon=True).start()
    if os.getppid() != parent:
        _handler(signal.SIGTERM, None)


def received() -> int | None:
    """The stop signal this process received, if any (no communication)."""
    signum = _received["signum"]
    return None if signum is None else int(signum)


def stop_agreed(device: torch.device) -> int | None:
    """Whether any rank received a stop signal (collective: every rank calls it each step).

    Args:
        device: this rank's device (the all-reduce runs there: NCCL needs a CUDA tensor).

    Returns:
        The largest signal number any rank received, or None when no rank was signalled.
    """
    flag = torch.tensor([received() or 0], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    signum = int(flag.item())
    return signum or None


def preempted_message(step: int, signum: int, saved: Path | None, load: str | None) -> str:
    """The one line a stopped run ends with: where it stopped and how to continue.

    Args:
        step: the last completed step.
        signum: the stop signal.
        saved: the checkpoint written at ``step``; None when ``checkpoint.save`` is unset.
        load: the run's ``checkpoint.load``.

    Returns:
        e.g. ``preempted at step 7 (SIGTERM): saved ckpt/iter_0000007; resume with the same
        command``.
    """
    head = f"preempted at step {step} ({signal.Signals(signum).name})"
    if saved is None:
        return f"{head}: nothing saved (checkpoint.save is not set)"
    root = saved.parent
    same = load is not None and Path(load).resolve() == root.resolve()
    how = "the same command" if same else f"the same command plus checkpoint.load={root}"
    return f"{head}: saved {saved}; resume with {how}"
