"""Every launcher against the real program: a 2-rank tiny DPO job started by torchrun (the
baseline), Slurm (``deepy.py --sbatch --wait`` and a bare ``srun`` inside ``salloc``), Open MPI's
``mpirun``, the DeepSpeed runner with a ``localhost slots=2`` hostfile, and torchrun's c10d
rendezvous with two one-rank "nodes" — each must log the baseline's losses, bit for bit (the same
ranks on the same machine run the same arithmetic; only how they found each other differs).

The local Slurm is ``tools/slurm/local_cluster.py`` (Debian's ``slurm-wlm`` + ``munge``, as root);
``.ci/run`` installs it and Open MPI. Where a system package is missing the test is skipped with a
reason naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.data.preprocess import PreprocessOptions, preprocess
from megatron.training.distributed import free_port
from tests.data.conftest import CHATML, conversational_pairs, write_jsonl
from tests.helpers_runs import tiny_run_config
from tests.training.helpers import write_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "slurm"))
import local_cluster  # noqa: E402

STEPS = 3
_LAUNCH_VARS = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_", "MV2_")


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_LAUNCH_VARS)
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    # the venv's python and programs first: jobs start from a fresh shell
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "PATH": path, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _losses(log_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (" ".join(cmd), proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny DPO run's config and its baseline losses (torchrun, 2 ranks, via deepy.py)."""
    tmp = tmp_path_factory.mktemp("cluster")
    (tmp / "chatml.jinja").write_text(CHATML)
    options = PreprocessOptions(data_format="pairwise", chat_template=str(tmp / "chatml.jinja"))
    pairs = write_jsonl(tmp / "train.jsonl", conversational_pairs(32))
    preprocess([pairs], tmp / "train", tiny_tokenizer_dir, options)
    cfg = tiny_run_config(
        "chat",
        train=tmp / "train",
        tokenizer=tiny_tokenizer_dir,
        logs=tmp / "torchrun",
        objective={"name": "dpo", "beta": 0.1},
        **{"training.train_iters": STEPS},
    )
    path = write_config(tmp / "dpo.yml", cfg)
    deepy = [sys.executable, "deepy.py", "train.py", str(path)]
    _run([*deepy, "launcher.nproc_per_node=2", f"launcher.master_port={free_port()}"], _env())
    baseline = _losses(tmp / "torchrun")
    assert sorted(baseline) == list(range(1, STEPS + 1))
    return tmp, path, deepy, baseline


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """``SLURM_CONF`` of a running one-node local Slurm."""
    missing = local_cluster.missing_programs()
    if missing:
        pytest.skip(f"needs Debian's slurm-wlm and munge (missing: {', '.join(missing)})")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm daemons need root (SlurmUser=root)")
    folder = tmp_path_factory.mktemp("slurm")
    conf = local_cluster.start(folder)
    yield str(conf)
    local_cluster.stop(folder)


def test_sbatch_job_runs_srun_inside_its_allocation(job, slurm):
    tmp, _, deepy, baseline = job
    out = tmp / "sbatch"
    r = _run(
        [*deepy, "--sbatch", "--wait", "launcher.type=slurm", "launcher.nproc_per_node=2",
         f"launcher.master_port={free_port()}", f"logging.dir={out}",
         "launcher.setup=[echo job $SLURM_JOB_ID on $SLURM_JOB_NODELIST]"],
        _env(SLURM_CONF=slurm),
    )  # fmt: skip
    assert "submitting" in r.stdout and (scripts := sorted(out.glob("megatron-*.sbatch")))
    text = scripts[-1].read_text()
    assert "#SBATCH --ntasks-per-node=2" in text and "#SBATCH --signal=B:USR1@120" in text
    logs = "".join(p.read_text() for p in out.glob("slurm-*.out"))
    assert "launching: srun --nodes=1 --ntasks=2" in logs, logs[-2000:]
    assert "launch: 2 ranks from slurm" in logs, logs[-2000:]
    assert _losses(out) == baseline


def test_bare_srun_inside_salloc(job, slurm):
    tmp, path, _, baseline = job
    out = tmp / "srun"
    r = _run(
        ["salloc", "-n", "2", "srun", sys.executable, "train.py", str(path), f"logging.dir={out}"],
        _env(SLURM_CONF=slurm),
    )
    assert "launch: 2 ranks from slurm" in r.stdout + r.stderr
    assert _losses(out) == baseline


@pytest.fixture(scope="module")
def mpirun():
    if shutil.which("mpirun") is None:
        pytest.skip("needs Open MPI's mpirun (apt-get install openmpi-bin)")
    # why: Open MPI refuses to start as root unless both variables say so (CI runs as root)
    return {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def test_mpirun_two_ranks(job, mpirun):
    tmp, _, deepy, baseline = job
    out = tmp / "mpirun"
    r = _run(
        [*deepy, "launcher.type=mpirun", "launcher.nproc_per_node=2",
         f"launcher.master_port={free_port()}", f"logging.dir={out}"],
        _env(**mpirun),
    )  # fmt: skip
    assert "launching: mpirun -np 2 --map-by ppr:2:node" in r.stdout
    assert "launch: 2 ranks from openmpi" in r.stdout + r.stderr
    assert _losses(out) == baseline


def test_deepspeed_runner_with_a_hostfile(job):
    tmp, _, deepy, baseline = job
    out = tmp / "deepspeed"
    hostfile = tmp / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    r = _run(
        [*deepy, "launcher.type=deepspeed", f"launcher.hostfile={hostfile}",
         "launcher.nproc_per_node=2", f"launcher.master_port={free_port()}",
         f"logging.dir={out}"],
        _env(),
    )  # fmt: skip
    assert f"--hostfile {hostfile} --num_nodes 1 --no_ssh_check" in r.stdout
    assert _losses(out) == baseline


def test_torchrun_c10d_rendezvous_of_two_nodes(job):
    """Two ``deepy.py`` processes, one rank each, joining at the same endpoint in any order."""
    tmp, _, deepy, baseline = job
    out = tmp / "c10d"
    args = [*deepy, "launcher.num_nodes=2", "launcher.nproc_per_node=1",
            "launcher.rdzv_backend=c10d", f"launcher.master_addr={socket.gethostname()}",
            f"launcher.master_port={free_port()}", f"logging.dir={out}"]  # fmt: skip
    nodes = [
        subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs
    assert "--rdzv_backend=c10d" in outputs[0]
    assert _losses(out) == baseline


def _template(name: str, folder: Path) -> Path:
    """A copy of ``tools/slurm/NAME`` for this one-node CPU cluster: its GPU request dropped
    (the local node has no GPUs); everything else as shipped."""
    text = (ROOT / "tools" / "slurm" / name).read_text()
    copy = folder / name
    copy.write_text(text.replace("#SBATCH --gpus-per-node", "##SBATCH --gpus-per-node"))
    return copy


def _sbatch(script: Path, env: dict[str, str], *options: str) -> subprocess.CompletedProcess:
    return _run(["sbatch", "--wait", "--ntasks-per-node=2", "--cpus-per-task=1",
                 f"--output={script.parent}/slurm-%j.out", *options, str(script)], env)  # fmt: skip


def test_train_template(job, slurm):
    tmp, path, _, baseline = job
    out = tmp / "template-train"
    folder = tmp / "templates"
    folder.mkdir(exist_ok=True)
    env = _env(SLURM_CONF=slurm, CONFIGS=str(path), REPO=str(ROOT),
               VENV=str(Path(sys.executable).parent.parent),
               OVERRIDES=f"logging.dir={out} launcher.master_port={free_port()}")  # fmt: skip
    _sbatch(_template("train.sbatch", folder), env)
    assert _losses(out) == baseline


def test_preprocess_and_precompute_templates(job, slurm, tiny_tokenizer_dir):
    tmp, path, _, _ = job
    folder = tmp / "templates"
    folder.mkdir(exist_ok=True)
    venv = str(Path(sys.executable).parent.parent)
    base = _env(SLURM_CONF=slurm, REPO=str(ROOT), VENV=venv)
    env = {**base, "INPUT": str(tmp / "train.jsonl"), "OUTPUT": str(tmp / "pre" / "pairs"),
           "TOKENIZER": str(tiny_tokenizer_dir), "FORMAT": "pairwise",
           "ARGS": f"--chat-template {tmp / 'chatml.jinja'}"}  # fmt: skip
    _sbatch(_template("preprocess.sbatch", folder), env, "--ntasks-per-node=1", "--cpus-per-task=2")
    assert (tmp / "pre" / "pairs.chosen.idx").is_file() and (
        tmp / "pre" / "pairs.meta.json"
    ).is_file()
    cache = tmp / "ref-cache"
    env = {**base, "CONFIGS": str(path), "CACHE": str(cache),
           "OVERRIDES": f"launcher.master_port={free_port()}"}  # fmt: skip
    _sbatch(_template("precompute_reference.sbatch", folder), env)
    assert (cache / "meta.json").is_file()


def test_mpi4py_reads_what_mpirun_leaves_out(mpirun, tmp_path):
    """Real MPI: with Open MPI's local-rank variables removed, mpi4py gives the local rank."""
    pytest.importorskip("mpi4py", reason="needs mpi4py (pip install -e '.[mpi]')")
    # why: a file per rank; the ranks' stdout lines reach mpirun's output interleaved (seen once)
    code = (
        "import os, sys, json; from megatron.training.rank_discovery import discover; "
        "e = {k: v for k, v in os.environ.items() if 'LOCAL' not in k}; d = discover(e, cuda=False); "
        "open(os.path.join(sys.argv[1], f'{os.getpid()}.json'), 'w').write("
        "json.dumps([d.source, d.rank, d.world_size, d.local_rank, d.local_world_size]))"
    )
    _run(["mpirun", "-np", "2", sys.executable, "-c", code, str(tmp_path)], _env(**mpirun))
    rows = sorted(json.loads(p.read_text()) for p in tmp_path.glob("*.json"))
    assert rows == [["openmpi", 0, 2, 0, 2], ["openmpi", 1, 2, 1, 2]]


def test_a_stop_reaches_the_ranks_through_srun(job, slurm):
    """SIGTERM to ``deepy.py`` inside an allocation: it relays SIGUSR1 through ``srun`` (which
    would cancel the step on SIGTERM), every rank saves at its step's end, exit 0."""
    import psutil

    tmp, path, _, _ = job
    save = tmp / "stop-ck"
    cmd = ["salloc", "-n", "2", sys.executable, "deepy.py", "train.py", str(path),
           "launcher.type=slurm", f"launcher.master_port={free_port()}",
           "training.train_iters=100000", f"checkpoint.save={save}",
           f"logging.dir={tmp / 'stop-logs'}"]  # fmt: skip
    # a session of its own: nothing Slurm signals reaches pytest's process group
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(SLURM_CONF=slurm), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if " step 2/" in line:
                break
        deepy = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "deepy.py" in " ".join(p.cmdline())]  # fmt: skip
        assert len(deepy) == 1, lines
        deepy[0].terminate()
        lines += proc.stdout.readlines()
        assert proc.wait(timeout=120) == 0, "".join(lines[-30:])
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines)
    assert "preempted at step" in text and "(SIGUSR1)" in text, text[-3000:]
    assert "CANCELLED" not in text
    assert (save / "latest").is_file()
