"""Train one run: ``python train.py CONFIG.yml [MORE.yml ...] [dotted.key=value ...]``.

Normally started by ``deepy.py`` (one process per rank); run directly for a single process.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

from megatron.ckpt.layout import CheckpointError, tag_for
from megatron.config import ConfigError, load_config, split_config_args
from megatron.rollout.rewards import RewardError
from megatron.training import signals
from megatron.training.distributed import LaunchEnvError, collective_failure, discover
from megatron.training.guards import DivergenceError
from megatron.utils import setup_logging

FAULT_ENV = "MEGATRON_FAULT_HANG_AFTER_STEP"


def _hang_after(step_to_hang: int):
    """Fault injection for tests: after ``step_to_hang`` (and its checkpoint) stop making progress
    and wait to be killed, so a test can SIGKILL every rank at a known point."""

    def hook(trainer, step: int) -> None:
        if step == step_to_hang:
            sys.stdout.flush()
            sys.stderr.flush()
            rank = os.environ.get("RANK", "0")
            marker = os.path.join(trainer.cfg.checkpoint.save, f".hung_rank{rank}")
            with open(marker, "w") as f:
                # why: launchers start each rank in its own session; the test kills this pid
                f.write(str(os.getpid()))
            while True:
                time.sleep(60)

    return hook


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    parent = os.getppid()  # before anything slow: install() checks the launcher is still there
    setup_logging()
    signals.install(parent)  # SIGTERM / SIGINT / SIGUSR1: checkpoint at the step's end and stop
    # why: DeepSpeed 0.19's ZeRO calls torch's renamed collective once per rank and run; the
    # FutureWarning is about DeepSpeed's code, not the user's, and floods every rank's output.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        category=FutureWarning,
    )
    files, overrides = split_config_args(argv)
    if not files:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        launch = discover(os.environ)  # fails fast on e.g. a bare multi-task srun / mpirun
    except LaunchEnvError as e:
        print(f"cannot start:\n  {e}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(files, overrides, world_size=launch.world_size)
    except ConfigError as e:
        if launch.rank == 0:
            print(f"config error:\n{e}", file=sys.stderr)
        return 2
    from megatron.training.preflight import preflight
    from megatron.training.trainer import Trainer

    # the trainer checks the reference cache on every rank; deepy.py (when it launched us) hashed
    # the checkpoint once already, else rank 0 does it here
    hashed = signals.PREFLIGHT_ENV in os.environ
    problems = preflight(cfg, fingerprints=False, checksums=launch.rank == 0 and not hashed)
    if problems:
        if launch.rank == 0:
            print("cannot start:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 2

    hooks = [_hang_after(int(os.environ[FAULT_ENV]))] if os.environ.get(FAULT_ENV) else []
    try:
        trainer = Trainer(cfg, hooks=hooks)
        trainer.train()
    except CheckpointError as e:  # e.g. a stale reference.cache: every rank finds the same
        if launch.rank == 0:
            print(f"cannot start:\n  {e}", file=sys.stderr, flush=True)
        return 2
    except RewardError as e:  # online RL: every rank raises the same one (RolloutSource)
        if launch.rank == 0:
            print(f"reward error (the run stops):\n  {e}", file=sys.stderr, flush=True)
        return 2
    except DivergenceError as e:  # every rank raises it at the same step: no peer is left waiting
        if launch.rank == 0:
            print(f"training diverged:\n  {e}", file=sys.stderr, flush=True)
        return 3
    except RuntimeError as e:
        line = collective_failure(e, launch.rank, cfg.training.collective_timeout_s)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        return 1  # no barrier: a peer is gone
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    if trainer.stop_signal is None:
        return 0
    save = cfg.checkpoint.save
    saved = Path(save) / tag_for(trainer.step) if save else None
    if launch.rank == 0:
        message = signals.preempted_message(
            trainer.step, trainer.stop_signal, saved, cfg.checkpoint.load
        )
        print(message, file=sys.stderr, flush=True)
    return 0 if saved else 128 + trainer.stop_signal


if __name__ == "__main__":
    code = main(sys.argv[1:])
    signals.record_exit_status(code)  # deepy.py exits with it (not the launcher's generic 1)
    sys.stdout.flush()
    sys.stderr.flush()
    # why: ending with os._exit avoids DeepSpeed/gloo's occasional SIGABRT at interpreter
    # shutdown (shared/notes/cpu-feasibility.md: 7 % of runs without it, 0/40 with it).
    os._exit(code)
