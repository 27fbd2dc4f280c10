"""Validate a run's config, then launch its ranks.

    python deepy.py train.py CONFIG.yml [MORE.yml ...] [dotted.key=value ...] [--dry-run]
    python deepy.py --sbatch [--wait] train.py CONFIG.yml ...   # submit a Slurm batch job
    python deepy.py tools/eval.py CONFIG.yml [key=value ...] -- --tasks T1,T2 [--ckpt DIR ...]

The config is loaded and checked *before* any process starts: an error is reported with its file
and key and nothing is launched. Then the ``launcher`` section decides how ranks start
(``megatron/training/launchers.py``):

* ``torchrun`` (default): torchrun (``tools/torchrun.py``: torch's ``torch.distributed.run``
  without its failure traceback) with ``nproc_per_node``, ``num_nodes`` and a ``static``
  rendezvous (``node_rank``, ``master_addr``, ``master_port``) or ``c10d`` (run the same command
  on every node; they meet at ``master_addr:master_port``);
* ``deepspeed``: the DeepSpeed runner (``--num_gpus``, or ``--hostfile`` for several nodes);
* ``slurm``: inside an allocation, ``srun`` one task per rank; outside one, ``--sbatch`` writes
  the batch script (``#SBATCH`` lines from the ``launcher`` section; it runs this same command
  inside the allocation) next to the run's logs and submits it (``--wait``: until the job ends,
  exiting with its status);
* ``mpirun``: Open MPI's ``mpirun`` or MPICH / Intel MPI's ``mpiexec`` (``hostfile``).

Without CUDA the ranks run on CPU (``DS_ACCELERATOR=cpu``, gloo). ``--dry-run`` prints the
command (with ``--sbatch``: the batch script) instead of running it.

Stopping: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 of ``deepy.py`` is forwarded once to every rank,
which checkpoints at the end of its step and exits (``megatron/training/signals.py``);
``deepy.py`` waits for the whole launched tree, and SIGKILLs what is left after
:data:`STOP_GRACE_S` or on a second signal. The launcher runs in a session of its own (a terminal's Ctrl-C reaches only
``deepy.py``, which forwards it) with a parent-death signal, so a SIGKILL of ``deepy.py`` reaches
it as SIGTERM; ranks on this machine watch ``deepy.py`` themselves too. ``srun`` and ``mpirun``
get the stop as SIGUSR1 and pass it to every rank on every node (SIGTERM would make them end the
job after their own short grace).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron.config import ConfigError, load_config, split_config_args
from megatron.training.launchers import LaunchError, launch_command, sbatch_script, world_size
from megatron.training.signals import (
    EXIT_DIR_ENV,
    LAUNCHER_PID_ENV,
    PREFLIGHT_ENV,
    REPEAT_WINDOW_S,
    recorded_exit_statuses,
    set_parent_death_signal,
)
from megatron.utils import atomic_write_text

STOP_GRACE_S = 120.0
"""Seconds the ranks get to checkpoint and exit after a forwarded signal before the SIGKILL."""

READS_CHECKPOINT_ONLY = frozenset({"eval.py"})
"""Scripts that only read a checkpoint: the training preflight (data, save dir) is skipped."""
_LAUNCHER_MODULES = ("tools/torchrun.py", "torch.distributed.run", "deepspeed.launcher")


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch/CUDA means CPU
        return 0


def _mpi_version() -> str:
    program = shutil.which("mpirun") or shutil.which("mpiexec") or "mpirun"
    out = subprocess.run([program, "--version"], capture_output=True, text=True, check=False)
    return out.stdout + out.stderr


def _tree(pid: int) -> tuple[list, list]:
    """``(launcher processes, rank processes)`` under the launcher ``pid`` (psutil objects).

    A rank is a child of a launcher process (torchrun, the DeepSpeed runner or its per-node
    ``deepspeed.launcher.launch``) that is not a launcher itself; a rank's own children (data
    workers, compilers) are neither.
    """
    # why: psutil comes with DeepSpeed (a dependency of this project) and reads /proc portably
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return [], []
    launchers, ranks = [], []
    for p in procs:
        try:
            cmdline = " ".join(p.cmdline())
            is_launcher = p.pid == pid or any(m in cmdline for m in _LAUNCHER_MODULES)
            (launchers if is_launcher else ranks).append(p)
        except psutil.Error:
            continue
    parents = {p.pid for p in launchers}
    return launchers, [p for p in ranks if p.ppid() in parents]


def _signal_all(procs: list, signum: int) -> None:
    for p in procs:
        try:
            p.send_signal(signum)
        except Exception:  # noqa: BLE001 - already gone
            pass


def run_launcher(
    cmd: list[str], env: dict[str, str], local: bool = True, relay: int | None = None
) -> int:
    """Run the launcher ``cmd``, forward SIGTERM/SIGINT/SIGUSR1 to its ranks, wait for it all.

    Args:
        cmd: the launcher's command line.
        env: its environment.
        local: every rank runs on this machine: they watch this process's pid (on other
            nodes that pid means nothing, and ``srun`` / ``mpirun`` end their tasks themselves).
        relay: send a stop to the launcher as this signal, for it to pass on to every rank
            (``srun`` and ``mpirun`` relay SIGUSR1 but end the job on SIGTERM); None: signal
            the ranks directly.

    Returns:
        The ranks' exit status when the launcher failed because ranks exited non-zero (the
        highest, e.g. 3 for a diverged run), else the launcher's (128 + N for signal N).
    """
    exit_dir = tempfile.mkdtemp(prefix="megatron-exit-")
    env = {**env, EXIT_DIR_ENV: exit_dir}
    if local:
        env[LAUNCHER_PID_ENV] = str(os.getpid())
    try:
        code = _run_tree(cmd, env, relay)
        ranks = recorded_exit_statuses(exit_dir)
    finally:
        shutil.rmtree(exit_dir, ignore_errors=True)
    if code and ranks:
        worst = max(ranks.values())
        print(
            f"deepy.py: the ranks exited with status {sorted(set(ranks.values()))} (see their "
            f"message above); exit status {worst}",
            file=sys.stderr,
            flush=True,
        )
        return worst
    return code


def _run_tree(cmd: list[str], env: dict[str, str], relay: int | None = None) -> int:
    """Start ``cmd`` in a session of its own and wait for it and every rank it started."""
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, preexec_fn=set_parent_death_signal
    )
    stop: dict[str, float] = {}

    def forward(signum: int, frame: object) -> None:
        now = time.monotonic()
        if "at" not in stop:
            stop["at"] = now
            name = signal.Signals(signum).name
            print(
                f"deepy.py: {name}: the ranks checkpoint and stop after their current step "
                f"(send it again to stop at once; SIGKILL after {STOP_GRACE_S:g} s)",
                file=sys.stderr,
                flush=True,
            )
            launchers, ranks = _tree(proc.pid)
            if relay is not None:
                proc.send_signal(relay)
            # no ranks yet (still starting): the launcher's session holds everything there is
            elif ranks:
                _signal_all(ranks, signal.SIGTERM)
            else:
                _signal_all(launchers, signal.SIGTERM)
        elif now - stop["at"] >= REPEAT_WINDOW_S:
            stop["at"] = now - STOP_GRACE_S  # the loop below kills everything now

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # USR1: Slurm's warning
        signal.signal(signum, forward)
    seen: dict[int, object] = {}  # every rank seen, so that ranks left behind are found too
    last_scan = 0.0
    while True:
        now, running = time.monotonic(), proc.poll() is None
        if running and now - last_scan >= 1.0:
            seen.update((p.pid, p) for p in _tree(proc.pid)[1])
            last_scan = now
        alive = [p for p in seen.values() if _running(p)]
        if not running and not alive:
            break
        if not running:
            stop.setdefault("at", now)  # the launcher is gone: its ranks get the grace period
        if "at" in stop and now - stop["at"] >= STOP_GRACE_S:
            _signal_all([*_tree(proc.pid)[0], *alive], signal.SIGKILL)
        time.sleep(0.2)
    code = proc.returncode
    return 128 - code if code < 0 else code


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _submit(script: str, files: list[str], overrides: list[str], cfg, dry: bool, wait: bool) -> int:
    """Write the batch script next to the run's logs and ``sbatch`` it (``--wait``: until it ends)."""
    la = cfg.launcher
    run_dir = Path(cfg.logging.dir or cfg.checkpoint.save or "runs/default").resolve()
    text = sbatch_script(
        str(Path(__file__).resolve()),
        script,
        files,
        overrides,
        cfg,
        output_dir=str(run_dir),
        workdir=os.getcwd(),
    )
    if dry:
        print(text, end="", flush=True)
        return 0
    if shutil.which("sbatch") is None:
        print("deepy.py --sbatch: sbatch is not on PATH (nothing submitted)", file=sys.stderr)
        return 2
    path = run_dir / f"{la.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    atomic_write_text(path, text)
    cmd = ["sbatch", *(["--wait"] if wait else []), str(path)]
    print(f"submitting {path}: " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=False).returncode


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    flags = {a for a in argv if a in ("--dry-run", "--sbatch", "--wait")}
    argv = [a for a in argv if a not in flags]
    dry, sbatch = "--dry-run" in flags, "--sbatch" in flags
    if "--wait" in flags and not sbatch:
        print("deepy.py: --wait goes with --sbatch (nothing launched)", file=sys.stderr)
        return 2
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    script, rest = argv[0], argv[1:]
    # a tool's own flags follow `--` (tools/eval.py): passed on to every rank untouched
    script_args = rest[rest.index("--") :] if "--" in rest else []
    rest = rest[: len(rest) - len(script_args)]
    if not os.path.isfile(script):
        print(
            f"deepy.py: {script}: no such script (usage: deepy.py train.py CONFIG.yml ...)",
            file=sys.stderr,
        )
        return 2
    files, overrides = split_config_args(rest)
    gpus = _gpu_count()
    try:
        probe = load_config(files, overrides)
        # --sbatch: the job's ranks, counted as outside any allocation (sbatch_script does too)
        world = world_size(probe.launcher, {} if sbatch else os.environ, 0 if sbatch else gpus)
        cfg = load_config(files, overrides, world_size=world)
    except ConfigError as e:
        print(f"config error (nothing launched):\n{e}", file=sys.stderr)
        return 2
    if sbatch and cfg.launcher.type != "slurm":
        print(
            f"deepy.py --sbatch: launcher.type is {cfg.launcher.type!r}; set launcher.type: "
            "slurm (nothing submitted)",
            file=sys.stderr,
        )
        return 2
    from megatron.training.preflight import preflight

    # tools/precompute_reference.py writes reference.cache: nothing there to check yet;
    # tools/eval.py reads a checkpoint only (it reports its own problems on rank 0)
    name = Path(script).name
    problems = (
        []
        if name in READS_CHECKPOINT_ONLY
        else preflight(cfg, writes_cache=name == "precompute_reference.py")
    )
    if problems:
        print(
            "cannot start (nothing launched):\n" + "\n".join(f"  {p}" for p in problems),
            file=sys.stderr,
        )
        return 2
    if sbatch:
        return _submit(script, files, [*overrides, *script_args], cfg, dry, "--wait" in flags)
    try:
        launch = launch_command(
            script,
            files,
            [*overrides, *script_args],
            cfg,
            os.environ,
            gpus=gpus,
            which=shutil.which,
            mpi_version=_mpi_version,
        )
    except LaunchError as e:
        print(f"cannot launch (nothing launched):\n  {e}", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k not in launch.unset}
    env.update(launch.env)
    from megatron.data.meta import TOKENIZER_IDENTITY_ENV, tokenizer_identities

    env[TOKENIZER_IDENTITY_ENV] = tokenizer_identities()  # the ranks need not load it again
    env[PREFLIGHT_ENV] = "1"  # the ranks need not hash the checkpoint again
    if gpus == 0:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    print("launching: " + " ".join(launch.cmd), flush=True)
    if dry:
        return 0
    return run_launcher(launch.cmd, env, local=launch.local, relay=launch.relay)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
