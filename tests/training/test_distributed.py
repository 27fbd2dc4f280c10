"""Rank discovery (``megatron/training/distributed.py``): each launcher's variables, the refusal of
multi-task launchers whose discovery is not wired, and a single-process start that leaves
``os.environ`` alone.

:func:`discover` is a pure function of a mapping, so most cases need no process; the real
``init_distributed`` runs in a subprocess so its process group cannot leak into other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.training.distributed import DistEnv, LaunchEnvError, discover, launcher_tasks

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "10.0.0.7",
    "MASTER_PORT": "29511",
}


@pytest.mark.parametrize(
    "extra,source",
    [
        ({"TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "2"}, "torchrun"),
        ({"CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2"}, "deepspeed"),
        ({}, "env"),  # exported by a job script (e.g. RANK=$SLURM_PROCID ...)
    ],
)
def test_rank_variables(extra, source):
    env = discover({**TORCHRUN, **extra}, cuda=False)
    assert env == DistEnv(
        rank=3,
        world_size=4,
        local_rank=1,
        master_addr="10.0.0.7",
        master_port=29511,
        device=torch.device("cpu"),
        source=source,
    )
    assert (env.backend, env.init_method) == ("gloo", "tcp://10.0.0.7:29511")


def test_rank_variables_win_over_the_launcher_that_started_torchrun():
    """``srun torchrun ...``: the Slurm step's variables are there too, torchrun's decide."""
    slurm = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    env = discover({**slurm, **TORCHRUN, "TORCHELASTIC_RUN_ID": "x"}, cuda=True)
    assert (env.rank, env.world_size, env.source) == (3, 4, "torchrun")
    assert (env.device, env.backend) == (torch.device("cuda", 1), "nccl")


def test_a_world_of_one_needs_only_rank_and_world_size():
    env = discover({"RANK": "0", "WORLD_SIZE": "1"}, cuda=False)
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0)
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 0)  # 0: init picks a free port


def test_ipv6_master_address_is_bracketed():
    env = discover({**TORCHRUN, "MASTER_ADDR": "fd00::7"}, cuda=False)
    assert env.init_method == "tcp://[fd00::7]:29511"


@pytest.mark.parametrize(
    "environ,match",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "missing LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "missing RANK"),
        ({**TORCHRUN, "RANK": "4"}, r"RANK \(4\) must be in \[0, WORLD_SIZE=4\)"),
        ({**TORCHRUN, "WORLD_SIZE": "four"}, "WORLD_SIZE='four' is not an integer"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, r"MASTER_PORT \(70000\) must be in"),
        ({**TORCHRUN, "LOCAL_RANK": "-1"}, r"LOCAL_RANK \(-1\) must be >= 0"),
    ],
)
def test_incomplete_or_inconsistent_rank_variables(environ, match):
    with pytest.raises(LaunchEnvError, match=match):
        discover(environ, cuda=False)


MULTI_TASK = {
    "srun": (
        {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"},
        r"Slurm \(srun\) started several tasks \(SLURM_NTASKS=4 SLURM_PROCID=2\)",
    ),
    "srun-step-tasks": (  # the step's count wins over the allocation's
        {"SLURM_STEPID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "8"},
        r"Slurm \(srun\) started several tasks \(SLURM_STEP_NUM_TASKS=2\)",
    ),
    "mpirun": (
        {
            "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        },
        r"Open MPI \(mpirun\) started several tasks \(OMPI_COMM_WORLD_SIZE=2",
    ),
    "mpiexec": (
        {"PMI_SIZE": "3", "PMI_RANK": "1"},
        r"MPICH / Intel MPI \(mpiexec\) started several tasks \(PMI_SIZE=3 PMI_RANK=1\)",
    ),
    "pmix-rank-only": ({"PMIX_RANK": "1"}, r"PMIx started several tasks \(PMIX_RANK=1\)"),
}


@pytest.mark.parametrize("launcher", sorted(MULTI_TASK))
def test_multi_task_launcher_without_rank_discovery_is_an_error(launcher):
    environ, match = MULTI_TASK[launcher]
    with pytest.raises(LaunchEnvError, match=match) as info:
        discover(environ, cuda=False)
    text = str(info.value)
    assert "not wired yet" in text and "python deepy.py" in text and "torchrun" in text


@pytest.mark.parametrize(
    "environ",
    [
        {},
        # the batch script of a 4-task job, or an salloc shell: one process, no job step
        {"SLURM_JOB_ID": "17", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"},
        {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"},  # srun -n 1
        {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"},  # mpirun -np 1
        {"PMI_SIZE": "1", "PMI_RANK": "0"},
        {"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29511"},  # meant for other processes
    ],
)
def test_single_process_when_no_launcher_says_otherwise(environ):
    assert launcher_tasks(environ) is None
    env = discover(environ, cuda=False)
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single-process")
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 0)


_CHILD = r"""
import json, os, sys
import torch.distributed as dist
from megatron.training.distributed import (
    LaunchEnvError, export_local_rank, import_deepspeed, init_distributed,
)

# Importing DeepSpeed sets variables of its own (DS_ACCELERATOR via import_deepspeed,
# PYTORCH_NVML_BASED_CUDA_CHECK in deepspeed/__init__.py): import it before the snapshot.
import_deepspeed()
out = {}
try:  # a bare 2-task mpirun: refused before any process group exists
    init_distributed({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"})
except LaunchEnvError as e:
    out["refused"] = str(e)
out["initialized_after_refusal"] = dist.is_initialized()
before = dict(os.environ)
env = init_distributed()
out["env_unchanged"] = dict(os.environ) == before
out["env"] = [env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
              str(env.device), env.source]
out["group"] = [dist.get_rank(), dist.get_world_size(), dist.get_backend()]
again = init_distributed()  # a second call wraps the existing group
out["again"] = [again.rank, again.world_size, again.source]
export_local_rank(env)
out["exported"] = {k: v for k, v in os.environ.items() if before.get(k) != v}
print("RESULT " + json.dumps(out))
sys.stdout.flush()
os._exit(0)  # why: see train.py (exit-time aborts of gloo/DeepSpeed)
"""

_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_")


def _bare_env() -> dict[str, str]:
    """This environment without any launcher's variables (the test may itself run under one)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith(_LAUNCHER_PREFIXES)
    }
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_single_process_init_leaves_os_environ_untouched():
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env=_bare_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    out = json.loads(lines[-1][len("RESULT ") :])
    assert "Open MPI (mpirun) started several tasks" in out["refused"]
    assert out["initialized_after_refusal"] is False
    assert out["env_unchanged"] is True
    rank, world, local, addr, port, device, source = out["env"]
    assert (rank, world, local, addr, device, source) == (
        0,
        1,
        0,
        "127.0.0.1",
        "cpu",
        "single-process",
    )
    assert 0 < port < 65536
    assert out["group"] == [0, 1, "gloo"]
    assert out["again"] == [0, 1, "already-initialized"]
    assert out["exported"] == {"LOCAL_RANK": "0"}  # the one variable DeepSpeed's engine reads


def test_train_py_refuses_a_bare_multi_task_launch(tmp_path):
    env = {**_bare_env(), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}
    proc = subprocess.run(
        [sys.executable, "train.py", str(tmp_path / "run.yml")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot start" in proc.stderr and "rank discovery" in proc.stderr
