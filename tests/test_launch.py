"""deepy.py: the config and the files are checked before anything launches; both launchers work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.training.distributed import free_port
from tests.training.helpers import read_losses, run_config, write_config, write_markov_corpus

ROOT = Path(__file__).resolve().parents[1]


def deepy(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "deepy.py", "train.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    prefix = write_markov_corpus(tmp / "corpus")
    return tmp, write_config(tmp / "run.yml", run_config(tmp, prefix))


def test_config_errors_are_reported_together_and_nothing_launches(run):
    tmp, cfg = run
    bad = tmp / "bad.yml"
    bad.write_text("training:\n  train_iter: 5\nparallel:\n  tensor: 3\n")
    r = deepy(str(cfg), str(bad), "optimizer.lr=fast")
    assert r.returncode == 2
    assert (
        f"{bad}: training.train_iter: unknown key 'train_iter'; did you mean 'train_iters'?"
        in r.stderr
    )
    assert "<override>: optimizer.lr:" in r.stderr
    assert "nothing launched" in r.stderr and "launching" not in r.stdout


def test_malformed_yaml_names_the_line(run):
    tmp, cfg = run
    bad = tmp / "broken.yml"
    bad.write_text("training:\n  train_iters: 5\n  seed: [1, 2\n")
    r = deepy(str(cfg), str(bad))
    assert r.returncode == 2 and f"{bad}:" in r.stderr
    assert "while parsing a flow sequence at line 3" in r.stderr


def test_impossible_grid_is_refused(run):
    _, cfg = run
    r = deepy(str(cfg), "parallel.tensor=2", "launcher.nproc_per_node=3")
    assert r.returncode == 2
    assert "world size (3)" in r.stderr and "nothing launched" in r.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.train=[{path: /nonexistent/corpus}]",
            "data.train[0]: /nonexistent/corpus",
        ),
        ("checkpoint.load=/nonexistent/ckpt", "checkpoint.load: /nonexistent/ckpt does not exist"),
    ],
)
def test_missing_files_are_refused_before_launch(run, override, message):
    _, cfg = run
    r = deepy(str(cfg), override)
    assert r.returncode == 2 and message in r.stderr and "nothing launched" in r.stderr


def test_corrupt_data_file_is_refused(run):
    tmp, cfg = run
    (tmp / "junk.idx").write_bytes(b"not an index at all" * 4)
    (tmp / "junk.bin").write_bytes(b"")
    r = deepy(str(cfg), f"data.train=[{{path: {tmp / 'junk'}}}]")
    assert r.returncode == 2 and f"{tmp / 'junk'}.idx" in r.stderr


def test_existing_checkpoints_are_not_overwritten(run):
    tmp, cfg = run
    save = tmp / "occupied"
    save.mkdir()
    (save / "latest").write_text("iter_0000005\n")
    r = deepy(str(cfg), f"checkpoint.save={save}")
    assert r.returncode == 2 and "already holds checkpoints" in r.stderr
    assert (save / "latest").read_text() == "iter_0000005\n"


def test_dry_run_prints_the_launch_commands(run):
    _, cfg = run
    r = deepy(str(cfg), "launcher.nproc_per_node=2", "launcher.master_port=30123", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "tools/torchrun.py --nproc_per_node=2 --nnodes=1" in r.stdout
    assert "--master_port=30123" in r.stdout
    r = deepy(str(cfg), "launcher.type=deepspeed", "launcher.nproc_per_node=2", "--dry-run")
    assert "deepspeed.launcher.runner" in r.stdout and "--num_accelerators 2" in r.stdout


def test_deepspeed_runner_trains_two_ranks(run):
    tmp, cfg = run
    r = deepy(
        str(cfg),
        "launcher.type=deepspeed",
        "launcher.nproc_per_node=2",
        f"launcher.master_port={free_port()}",
        "training.train_iters=3",
        f"logging.dir={tmp / 'ds'}",
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert sorted(read_losses(tmp / "ds" / "metrics.jsonl")) == [1, 2, 3]


def _no_slurm_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def deepy_env(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "deepy.py", *args],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["launcher.type=slurm"], "not inside a Slurm allocation (no SLURM_JOB_ID): add --sbatch"),
        (["--sbatch"], "deepy.py --sbatch: launcher.type is 'torchrun'; set launcher.type: slurm"),
        (["--wait"], "--wait goes with --sbatch"),
        (
            ["launcher.type=slurm", "launcher.nproc_per_node=3", "parallel.tensor=2", "--sbatch"],
            "world size (3)",
        ),
        (["launcher.type=deepspeed", "launcher.hostfile=/nonexistent/hosts"], "does not exist"),
        (["launcher.type=mpirun", "launcher.num_nodes=2"], "needs a launcher.hostfile"),
    ],
)
def test_bad_launches_are_refused_before_any_rank_starts(run, args, message):
    _, cfg = run
    flags = [a for a in args if a.startswith("--")]
    keys = [a for a in args if not a.startswith("--")]
    r = deepy_env(*flags, "train.py", str(cfg), *keys, env=_no_slurm_env())
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "launching" not in r.stdout


def test_sbatch_dry_run_prints_the_batch_script(run):
    tmp, cfg = run
    r = deepy_env(
        "--sbatch", "--dry-run", "train.py", str(cfg), "launcher.type=slurm",
        "launcher.num_nodes=2", "launcher.nproc_per_node=2", "launcher.partition=gpu",
        "launcher.time=02:00:00", "training.global_batch_size=8", f"logging.dir={tmp / 'sb'}",
        env=_no_slurm_env(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --partition=gpu" in lines
    assert f"#SBATCH --output={tmp / 'sb'}/slurm-%j.out" in lines
    assert lines[-1].startswith(f"exec {sys.executable} {ROOT / 'deepy.py'} train.py {cfg}")
    assert not (tmp / "sb").exists()  # a dry run writes nothing


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun (openmpi-bin)")
def test_mpirun_dry_run(run):
    _, cfg = run
    r = deepy(str(cfg), "launcher.type=mpirun", "launcher.nproc_per_node=2", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "launching: mpirun -np 2 --map-by ppr:2:node --bind-to none -x MASTER_ADDR" in r.stdout
