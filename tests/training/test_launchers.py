"""The launch command of every ``launcher.type`` (``megatron/training/launchers.py``), built without
running anything, and each bad input's one-line error before any rank starts. The real launches
are ``tests/test_cluster_launch.py``."""

from __future__ import annotations

import sys

import pytest

from megatron.config import ConfigError
from megatron.config.sections import LauncherConfig
from megatron.training.launchers import (
    LaunchError,
    launch_command,
    mpi_flavour,
    parse_hostfile,
    sbatch_script,
    world_size,
)

OPEN_MPI = "mpirun (Open MPI) 4.1.4\n\nReport bugs to http://www.open-mpi.org/community/help/\n"
HYDRA = "HYDRA build details:\n    Version:                                 4.0.2\n"
ALLOCATION = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "8",
              "SLURM_TASKS_PER_NODE": "4(x2)"}  # fmt: skip


class _Cfg:
    def __init__(self, **launcher):
        self.launcher = LauncherConfig(**launcher)


def _which(*present):
    return lambda name: f"/usr/bin/{name}" if name in present else None


def _launch(environ=None, gpus=0, which=("srun", "mpirun"), version=OPEN_MPI, **launcher):
    return launch_command(
        "train.py", ["run.yml"], ["training.train_iters=5"], _Cfg(**launcher), environ or {},
        gpus=gpus, which=_which(*which), mpi_version=lambda: version,
    )  # fmt: skip


def test_torchrun_static_and_c10d():
    launch = _launch(nproc_per_node=4)
    assert launch.cmd[2:] == [
        "--nproc_per_node=4", "--nnodes=1", "--node_rank=0", "--master_addr=127.0.0.1",
        "--master_port=29500", "train.py", "run.yml", "training.train_iters=5",
    ]  # fmt: skip
    assert launch.local
    launch = _launch(num_nodes=2, nproc_per_node=8, rdzv_backend="c10d", master_addr="n0")
    assert "--rdzv_endpoint=n0:29500" in launch.cmd and "--rdzv_id=megatron" in launch.cmd
    assert not any(a.startswith("--node_rank") for a in launch.cmd) and not launch.local


def test_multi_node_needs_a_reachable_address():
    for kw in ({"rdzv_backend": "c10d"}, {"node_rank": 1}):
        with pytest.raises(LaunchError, match=r"launcher.master_addr \(127.0.0.1\) must be"):
            _launch(num_nodes=2, **kw)


def test_srun_inside_an_allocation():
    launch = _launch(ALLOCATION, type="slurm", num_nodes=2, gpus_per_node=4, cpus_per_task=8)
    assert launch.cmd[:8] == [
        "srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--kill-on-bad-exit=1",
        "--export=ALL", "--gpus-per-node=4", "--cpus-per-task=8",
    ]  # fmt: skip
    assert launch.cmd[8:10] == [sys.executable, "train.py"]
    assert launch.env == {"MASTER_PORT": "29500"}  # the address: the allocation's first node
    assert "RANK" in launch.unset and "MASTER_ADDR" in launch.unset
    assert world_size(_Cfg(type="slurm", num_nodes=2).launcher, ALLOCATION, 0) == 8


@pytest.mark.parametrize(
    "environ,launcher,which,match",
    [
        ({}, {}, ("srun",), "not inside a Slurm allocation.*add --sbatch"),
        (ALLOCATION, {}, (), "srun is not on PATH"),
        (ALLOCATION, {"num_nodes": 3}, ("srun",), r"num_nodes \(3\) exceeds the allocation's 2"),
        (ALLOCATION, {"nproc_per_node": 5, "num_nodes": 2}, ("srun",),
         r"10 ranks .* exceed the allocation's 8 tasks"),
    ],
)  # fmt: skip
def test_slurm_refusals(environ, launcher, which, match):
    with pytest.raises(LaunchError, match=match):
        _launch(environ, which=which, type="slurm", **launcher)


def test_mpirun_open_mpi_and_hydra(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=4\nnode-b slots=4 max_slots=8\n")
    launch = _launch(type="mpirun", nproc_per_node=4, num_nodes=2, hostfile=str(hostfile))
    assert launch.cmd[:9] == ["mpirun", "-np", "8", "--map-by", "ppr:4:node", "--bind-to",
                              "none", "--hostfile", str(hostfile)]  # fmt: skip
    assert ["-x", "MASTER_ADDR"] == launch.cmd[9:11]
    assert launch.env == {"MASTER_ADDR": "node-a", "MASTER_PORT": "29500"}  # the first host
    hostfile.write_text("node-a:4\nnode-b:4\n")
    launch = _launch(type="mpirun", nproc_per_node=4, num_nodes=2, hostfile=str(hostfile),
                     version=HYDRA)  # fmt: skip
    assert launch.cmd[:7] == ["mpiexec", "-n", "8", "-ppn", "4", "-f", str(hostfile)]


@pytest.mark.parametrize(
    "text,match",
    [
        (None, "does not exist"),
        ("# nothing\n\n", "lists no host with slots"),
        ("node-a slots=two\n", r"hosts:1: 'node-a slots=two' is not 'host slots=N'"),
        ("node-a slots=0\n", r"hosts:1: node-a has 0 slots"),
        ("node-a slots=2\n", r"node-a has fewer slots than launcher.nproc_per_node \(4\)"),
    ],
)
def test_bad_hostfiles(tmp_path, text, match):
    hostfile = tmp_path / "hosts"
    if text is not None:
        hostfile.write_text(text)
    with pytest.raises(LaunchError, match=match):
        _launch(type="mpirun", nproc_per_node=4, hostfile=str(hostfile))


def test_mpirun_refusals(tmp_path):
    with pytest.raises(LaunchError, match="neither mpirun nor mpiexec is on PATH"):
        _launch(type="mpirun", which=())
    with pytest.raises(LaunchError, match="needs a launcher.hostfile"):
        _launch(type="mpirun", num_nodes=2)
    with pytest.raises(LaunchError, match="names neither Open MPI nor MPICH"):
        mpi_flavour("Some MPI 1.0")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=4\n")
    with pytest.raises(LaunchError, match=r"lists 1 hosts, fewer than launcher.num_nodes \(2\)"):
        _launch(type="deepspeed", num_nodes=2, hostfile=str(hostfile))


def test_deepspeed_runner():
    launch = _launch(type="deepspeed", nproc_per_node=2)
    assert "--num_accelerators" in launch.cmd and "--hostfile" not in launch.cmd
    assert "--num_gpus" in _launch(type="deepspeed", nproc_per_node=2, gpus=2).cmd


def test_hostfile_forms(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("a slots=8  # GPU node\nb:4\nc\n")
    assert parse_hostfile(str(path)) == [("a", 8), ("b", 4), ("c", 1)]


def test_sbatch_script(tmp_path):
    cfg = _Cfg(type="slurm", num_nodes=2, nproc_per_node=8, gpus_per_node=8, partition="gpu",
               account="lab", time="1-00:00:00", sbatch_lines=["--exclusive"],
               setup=["module load cuda", "source .venv/bin/activate"])  # fmt: skip
    run = tmp_path / "run.yml"
    text = sbatch_script("/repo/deepy.py", "train.py", [str(run)], ["optimizer.lr=1e-5"], cfg,
                         output_dir="/runs/x", workdir="/repo")  # fmt: skip
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for want in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --account=lab", "#SBATCH --time=1-00:00:00",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --output=/runs/x/slurm-%j.out",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --exclusive", "cd /repo",
                 "module load cuda"):  # fmt: skip
        assert want in lines, want
    assert lines[-1] == (f"exec {sys.executable} /repo/deepy.py train.py {run} optimizer.lr=1e-5")


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"partition": "gpu"}, r"partition: is only used by launcher.type 'slurm'"),
        ({"type": "slurm", "time": "2h"}, r"'2h' is not a Slurm time"),
        ({"hostfile": "h"}, r"hostfile: is only used by launcher.type 'deepspeed' or 'mpirun'"),
        ({"type": "slurm", "rdzv_backend": "c10d"}, r"c10d is torchrun's"),
        ({"rdzv_backend": "c10d", "num_nodes": 2, "node_rank": 1}, "decided by the c10d"),
        ({"type": "slurm", "job_name": "my job"}, r"job_name: 'my job': use letters"),
    ],
)
def test_launcher_section_rules(fields, match):
    with pytest.raises(ConfigError, match=match):
        LauncherConfig(**fields)
