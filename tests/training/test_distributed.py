"""Rank discovery (``megatron/training/rank_discovery.py``): each launcher's variables, recorded
Slurm / MPI environments (one node, and 2 nodes x 4 tasks), contradictions, and a single-process
start that leaves ``os.environ`` alone.

:func:`discover` is a pure function of a mapping, so most cases need no process; the real
``init_distributed`` runs in a subprocess so its process group cannot leak into other tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.training.distributed import DistEnv, LaunchEnvError, discover, expand_hostlist
from megatron.training.rank_discovery import job_port

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "10.0.0.7",
    "MASTER_PORT": "29511",
}


@pytest.mark.parametrize(
    "extra,source,node,local_size",
    [
        (
            {"TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"},
            "torchrun",
            1,
            2,
        ),
        ({"CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2"}, "deepspeed", 1, 2),
        ({}, "env", 0, 1),  # exported by a job script (e.g. RANK=$SLURM_PROCID ...)
    ],
)
def test_rank_variables(extra, source, node, local_size):
    env = discover({**TORCHRUN, **extra}, cuda=False)
    assert env == DistEnv(
        rank=3,
        world_size=4,
        local_rank=1,
        master_addr="10.0.0.7",
        master_port=29511,
        device=torch.device("cpu"),
        source=source,
        node_rank=node,
        local_world_size=local_size,
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


# Recorded: `srun -n 2 env` in the local Slurm of tools/slurm/local_cluster.py (task 1 of 2).
SRUN_1_OF_2 = {
    "SLURM_JOB_ID": "1", "SLURM_JOBID": "1", "SLURM_JOB_NODELIST": "vm", "SLURM_NODELIST": "vm",
    "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_LOCALID": "1",
    "SLURM_PROCID": "1", "SLURM_NPROCS": "2", "SLURM_NTASKS": "2", "SLURM_STEPID": "0",
    "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "vm", "SLURM_STEP_NUM_NODES": "1",
    "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2",
    "SLURM_CPUS_ON_NODE": "2", "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
}  # fmt: skip
# Recorded: Open MPI 4.1.4 `mpirun -np 2 env` (task 1 of 2).
MPIRUN_1_OF_2 = {
    "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1", "OMPI_UNIVERSE_SIZE": "2",
    "OMPI_MCA_ess_base_jobid": "1283784705", "PMIX_NAMESPACE": "1283784705", "PMIX_RANK": "1",
}  # fmt: skip
# 2 nodes x 4 tasks, task 5 (node 1, local rank 1), as each launcher documents its variables.
SLURM_2X4 = {
    **SRUN_1_OF_2,
    "SLURM_JOB_ID": "4711", "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_NODELIST": "gpu-[07-08]",
    "SLURM_STEP_NODELIST": "gpu-[07-08]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
    "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_LOCALID": "1", "SLURM_PROCID": "5",
    "SLURM_NPROCS": "8", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_TASKS_PER_NODE": "4(x2)",
}  # fmt: skip
OMPI_2X4 = {
    **MPIRUN_1_OF_2,
    "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "PMIX_RANK": "5",
}  # fmt: skip
HYDRA_2X4 = {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4",
             "PMI_FD": "6", "PMI_KVSNAME": "kvs_4242_0"}  # fmt: skip
MV2_2X4 = {"MV2_COMM_WORLD_RANK": "5", "MV2_COMM_WORLD_SIZE": "8",
           "MV2_COMM_WORLD_LOCAL_RANK": "1", "MV2_COMM_WORLD_LOCAL_SIZE": "4",
           "MPIRUN_ID": "9001"}  # fmt: skip


def _fields(env: DistEnv) -> tuple:
    return (env.source, env.rank, env.world_size, env.local_rank, env.node_rank,
            env.local_world_size, env.master_addr)  # fmt: skip


def test_srun_on_one_node():
    env = discover(SRUN_1_OF_2, cuda=False)
    assert _fields(env) == ("slurm", 1, 2, 1, 0, 2, "127.0.0.1")
    assert env.master_port == job_port("slurm-1.0")  # every task of the step derives the same


def test_mpirun_on_one_node():
    env = discover(MPIRUN_1_OF_2, cuda=False)
    assert _fields(env) == ("openmpi", 1, 2, 1, 0, 2, "127.0.0.1")
    assert env.master_port == job_port("openmpi-1283784705")


@pytest.mark.parametrize(
    "environ,expected",
    [
        (SLURM_2X4, ("slurm", 5, 8, 1, 1, 4, "gpu-07")),
        ({**OMPI_2X4, "MASTER_ADDR": "gpu-07"}, ("openmpi", 5, 8, 1, 1, 4, "gpu-07")),
        ({**HYDRA_2X4, "MASTER_ADDR": "gpu-07"}, ("mpich", 5, 8, 1, 1, 4, "gpu-07")),
        ({**MV2_2X4, "MASTER_ADDR": "gpu-07"}, ("mvapich", 5, 8, 1, 1, 4, "gpu-07")),
    ],
    ids=["slurm", "openmpi", "mpich", "mvapich"],
)
def test_two_nodes_of_four(environ, expected):
    env = discover({**environ, "MASTER_PORT": "29600"}, cuda=True)
    assert _fields(env) == expected
    assert (env.master_port, env.device, env.backend) == (29600, torch.device("cuda", 1), "nccl")
    assert env.describe() == f"8 ranks from {expected[0]} (2 nodes x 4), store gpu-07:29600"


def test_mpi4py_fills_in_what_the_launcher_leaves_out():
    asked = []

    def mpi():
        asked.append(1)
        return {"rank": 5, "world": 8, "local": 1, "local_size": 4, "addr": "10.1.0.7"}

    # several nodes, no MASTER_ADDR: rank 0's address comes from MPI (a broadcast)
    env = discover(OMPI_2X4, cuda=False, mpi=mpi)
    assert _fields(env) == ("openmpi", 5, 8, 1, 1, 4, "10.1.0.7")
    # PMIx gives a rank only: MPI gives the rest
    env = discover({"PMIX_RANK": "5", "PMIX_NAMESPACE": "ns"}, cuda=False, mpi=mpi)
    assert _fields(env) == ("pmix", 5, 8, 1, 1, 4, "10.1.0.7")
    # a complete Slurm step never asks
    discover(SLURM_2X4, cuda=False, mpi=mpi)
    assert len(asked) == 2


def test_without_mpi4py_the_missing_piece_is_named():
    def no_mpi():
        raise ImportError("mpi4py")

    with pytest.raises(LaunchEnvError, match=r"rank 0's host.*mpi4py.*MASTER_ADDR"):
        discover(OMPI_2X4, cuda=False, mpi=no_mpi)
    with pytest.raises(LaunchEnvError, match=r"pmix started.*world size.*pip install"):
        discover({"PMIX_RANK": "1"}, cuda=False, mpi=no_mpi)
    with pytest.raises(LaunchEnvError, match=r"mpich .*local rank.*mpi4py"):
        discover({"PMI_SIZE": "3", "PMI_RANK": "1"}, cuda=False, mpi=no_mpi)
    # no count of the ranks per node: one node or several? only MPI can say
    hydra = {"PMI_SIZE": "8", "PMI_RANK": "5", "MPI_LOCALRANKID": "1"}
    with pytest.raises(LaunchEnvError, match=r"rank 0's host.*MASTER_ADDR"):
        discover(hydra, cuda=False, mpi=no_mpi)
    two_nodes = {"rank": 5, "world": 8, "local": 1, "local_size": 4, "addr": "10.1.0.7"}
    env = discover(hydra, cuda=False, mpi=lambda: two_nodes)
    assert (env.node_rank, env.local_world_size, env.master_addr) == (1, 4, "10.1.0.7")


def test_mpi_launchers_inside_a_slurm_step():
    # mpirun in an allocation starts its daemons as a one-task-per-node step: Open MPI decides
    env = discover({**SRUN_1_OF_2, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1",
                    **MPIRUN_1_OF_2}, cuda=False)  # fmt: skip
    assert (env.source, env.rank, env.world_size) == ("openmpi", 1, 2)
    # Hydra's proxies likewise (PMI's 8 tasks vs the step's 2)
    step = {**SLURM_2X4, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    env = discover({**step, **HYDRA_2X4}, cuda=False)
    assert (env.source, env.rank, env.world_size, env.master_addr) == ("mpich", 5, 8, "gpu-07")
    # srun --mpi=pmi2 sets PMI_* for the step's own tasks: read as Slurm
    env = discover({**SLURM_2X4, "PMI_RANK": "5", "PMI_SIZE": "8"}, cuda=False)
    assert env.source == "slurm"


CONTRADICTIONS = {
    "slurm-pmi-disagree": (
        {**SLURM_2X4, "PMI_RANK": "4", "PMI_SIZE": "8"},
        r"Slurm and PMI disagree on this rank: SLURM_PROCID=5, PMI_RANK=4",
    ),
    "slurm-rank-outside": ({**SRUN_1_OF_2, "SLURM_PROCID": "2"}, r"rank \(2\) must be in \[0, world size=2\)"),
    "slurm-no-size": (
        {k: v for k, v in SRUN_1_OF_2.items()
         if k not in ("SLURM_NTASKS", "SLURM_NPROCS", "SLURM_STEP_NUM_TASKS")},
        "slurm: no world size variable",
    ),
    "slurm-no-localid": (
        {k: v for k, v in SRUN_1_OF_2.items() if k != "SLURM_LOCALID"}, "slurm: no local rank"
    ),
    "slurm-node-outside": ({**SLURM_2X4, "SLURM_NODEID": "2"}, r"node id \(2\) must be in \[0, nodes=2\)"),
    "slurm-bad-nodelist": ({**SLURM_2X4, "SLURM_STEP_NODELIST": "gpu-[07-"}, "unbalanced brackets"),
    "ompi-local-outside": ({**OMPI_2X4, "OMPI_COMM_WORLD_LOCAL_RANK": "4"}, r"local rank \(4\) must be < local size \(4\)"),
    "ompi-not-integer": ({**MPIRUN_1_OF_2, "OMPI_COMM_WORLD_SIZE": "two"}, "OMPI_COMM_WORLD_SIZE='two' is not an integer"),
    "bad-master-port": ({**SRUN_1_OF_2, "MASTER_PORT": "http"}, "MASTER_PORT='http' must be a port"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_partial_or_contradictory_variables_are_an_error(case):
    environ, match = CONTRADICTIONS[case]

    def mpi():
        raise AssertionError("contradictions are reported before MPI is asked")

    with pytest.raises(LaunchEnvError, match=match):
        discover(environ, cuda=False, mpi=mpi)


@pytest.mark.parametrize(
    "expr,hosts",
    [
        ("vm", ["vm"]),
        ("gpu-[07-08,11],cpu1", ["gpu-07", "gpu-08", "gpu-11", "cpu1"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("a[1],b-[3-4]", ["a1", "b-3", "b-4"]),
    ],
)
def test_slurm_host_lists(expr, hosts, tmp_path):
    assert expand_hostlist(expr) == hosts
    if shutil.which("scontrol"):  # Slurm's own reading, where Slurm is installed
        conf = tmp_path / "slurm.conf"  # scontrol wants a config, even to expand a list
        conf.write_text("ClusterName=t\nSlurmctldHost=localhost\n")
        env = {**os.environ, "SLURM_CONF": str(conf)}
        out = subprocess.run(["scontrol", "show", "hostnames", expr], capture_output=True,
                             text=True, check=True, env=env).stdout.split()  # fmt: skip
        assert out == hosts


@pytest.mark.parametrize(
    "environ",
    [
        {},
        # the batch script of a 4-task job, or an salloc shell: one process, no job step
        {"SLURM_JOB_ID": "17", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"},
        {"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29511"},  # meant for other processes
    ],
)
def test_single_process_when_no_launcher_says_otherwise(environ):
    env = discover(environ, cuda=False)
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single-process")
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 0)


@pytest.mark.parametrize(
    "environ,source",
    [
        ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, "slurm"),  # srun -n 1
        ({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, "openmpi"),  # mpirun -np 1
        ({"PMI_SIZE": "1", "PMI_RANK": "0"}, "mpich"),
    ],
)
def test_a_launcher_of_one_task_binds_its_own_store(environ, source):
    env = discover({**environ, "MASTER_ADDR": "10.0.0.7"}, cuda=False)
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, source)
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
try:  # a contradictory mpirun environment: refused before any process group exists
    init_distributed({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "2",
                      "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
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
    assert "rank (2) must be in [0, world size=2)" in out["refused"]
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


def test_train_py_refuses_a_contradictory_launch(tmp_path):
    env = {**_bare_env(), **SLURM_2X4, "SLURM_NODEID": "3"}
    proc = subprocess.run(
        [sys.executable, "train.py", str(tmp_path / "run.yml")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot start" in proc.stderr and "node id (3) must be in [0, nodes=2)" in proc.stderr
