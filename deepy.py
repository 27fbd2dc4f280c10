"""Validate a run's config, then launch its ranks.

    python deepy.py train.py CONFIG.yml [MORE.yml ...] [dotted.key=value ...] [--dry-run]

The config is loaded and checked *before* any process starts: an error is reported with its file
and key and nothing is launched. Then the ``launcher`` section decides how ranks start:

* ``torchrun`` (default): ``python -m torch.distributed.run`` with ``nproc_per_node``,
  ``num_nodes``, ``node_rank``, ``master_addr``, ``master_port``;
* ``deepspeed``: the DeepSpeed runner (``--num_gpus``, or ``--hostfile`` for several nodes).

Without CUDA the ranks run on CPU (``DS_ACCELERATOR=cpu``, gloo). ``--dry-run`` prints the
command instead of running it.
"""

from __future__ import annotations

import os
import subprocess
import sys

from megatron.config import ConfigError, load_config, split_config_args


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch/CUDA means CPU
        return 0


def launch_command(script: str, files: list[str], overrides: list[str], cfg) -> list[str]:
    """The command line that starts every local rank of ``script``."""
    la = cfg.launcher
    nproc = la.nproc_per_node or max(_gpu_count(), 1)
    user_args = [*files, *overrides]
    if la.type == "deepspeed":
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--master_addr",
            la.master_addr,
            "--master_port",
            str(la.master_port),
        ]
        if la.hostfile:
            cmd += ["--hostfile", la.hostfile, "--num_nodes", str(la.num_nodes)]
        if _gpu_count() == 0:
            cmd += ["--num_accelerators", str(nproc)]
        else:
            cmd += ["--num_gpus", str(nproc)]
        return [*cmd, script, *user_args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--nnodes={la.num_nodes}",
        f"--node_rank={la.node_rank}",
        f"--master_addr={la.master_addr}",
        f"--master_port={la.master_port}",
        script,
        *user_args,
    ]


def main(argv: list[str]) -> int:
    dry = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    script, rest = argv[0], argv[1:]
    if not os.path.isfile(script):
        print(
            f"deepy.py: {script}: no such script (usage: deepy.py train.py CONFIG.yml ...)",
            file=sys.stderr,
        )
        return 2
    files, overrides = split_config_args(rest)
    try:
        probe = load_config(files, overrides)
        la = probe.launcher
        world = (la.nproc_per_node or max(_gpu_count(), 1)) * la.num_nodes
        cfg = load_config(files, overrides, world_size=world)
    except ConfigError as e:
        print(f"config error (nothing launched):\n{e}", file=sys.stderr)
        return 2
    from megatron.training.preflight import preflight

    problems = preflight(cfg)
    if problems:
        print(
            "cannot start (nothing launched):\n" + "\n".join(f"  {p}" for p in problems),
            file=sys.stderr,
        )
        return 2
    cmd = launch_command(script, files, overrides, cfg)
    env = dict(os.environ)
    if _gpu_count() == 0:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    print("launching: " + " ".join(cmd), flush=True)
    if dry:
        return 0
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
