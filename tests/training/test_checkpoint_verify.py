"""``checkpoint.load`` is verified before launch: one line per problem, naming the file or key.

One tiny ZeRO-1 checkpoint is saved per module; each test checks a damaged or mismatched copy
with ``preflight`` in-process (two go through ``deepy.py`` end to end).
"""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from megatron.ckpt.manifest import MANIFEST, read_manifest
from megatron.config import load_config
from megatron.errors import ConfigError
from megatron.training.checkpointing import _missing_rng_message
from megatron.training.preflight import preflight
from tests.training.ckpt_helpers import deepy, save_tiny_checkpoint

MODEL = "mp_rank_00_model_states.pt"
TAG = "iter_0000002"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("verify"))


@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy of the saved checkpoint directory (with ``latest``)."""
    copy = tmp_path / "ckpt"
    shutil.copytree(saved[1], copy)
    return copy


def _problems(saved, load, *overrides: str) -> list[str]:
    cfg = load_config([saved[0]], [f"checkpoint.load={load}", *overrides], world_size=1)
    return preflight(cfg)


def test_manifest_lists_every_file_and_latest_is_written_after_it(saved):
    tag = saved[1] / TAG
    files = read_manifest(tag)
    on_disk = {p.name for p in tag.iterdir()} - {MANIFEST}
    assert set(files) == on_disk and all(len(e["sha256"]) == 64 for e in files.values())
    assert (saved[1] / "latest").stat().st_mtime_ns >= (tag / MANIFEST).stat().st_mtime_ns


def test_intact_checkpoint_passes(saved, ckpt):
    assert _problems(saved, ckpt) == []


def test_truncated_shard_is_named_with_both_sizes(saved, ckpt):
    path = ckpt / TAG / MODEL
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:100])
    assert _problems(saved, ckpt) == [
        f"checkpoint.load: {path} is truncated or changed: 100 bytes, the manifest says {size}"
    ]


def test_missing_file_is_named(saved, ckpt):
    path = ckpt / TAG / "rng_state_rank0.pt"
    size = path.stat().st_size
    path.unlink()
    assert _problems(saved, ckpt) == [
        f"checkpoint.load: {path} is missing (the manifest lists it, {size} bytes)"
    ]


def test_changed_bytes_are_caught_by_the_checksum(saved, ckpt):
    path = ckpt / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(path.read_bytes())
    data[-30] ^= 0xFF
    path.write_bytes(bytes(data))
    (line,) = _problems(saved, ckpt)
    assert line.startswith(f"checkpoint.load: {path} was changed since it was saved: sha256")


def test_iteration_dir_without_manifest_is_an_incomplete_save(saved, ckpt):
    (ckpt / TAG / MANIFEST).unlink()
    (line,) = _problems(saved, ckpt / TAG)
    assert line.startswith(f"checkpoint.load: incomplete save: {ckpt / TAG / MANIFEST} is missing")
    assert "ranks" not in line


def test_iteration_dir_without_client_state_is_an_incomplete_save(saved, ckpt):
    (ckpt / TAG / "client_state.json").unlink()
    (line,) = _problems(saved, ckpt / TAG)
    assert line.startswith(
        f"checkpoint.load: incomplete save: {ckpt / TAG / 'client_state.json'} is missing"
    )


def test_architecture_mismatch_on_resume(saved, ckpt):
    problems = _problems(saved, ckpt, "model.num_layers=3")
    assert problems == [
        "model.num_layers: checkpoint 2, config 3 (checkpoint.load holds another architecture)"
    ]


def test_architecture_mismatch_on_finetune(saved, ckpt):
    problems = _problems(saved, ckpt, "checkpoint.finetune=true", "model.ffn_hidden_size=96")
    assert problems == [
        "model.ffn_hidden_size: checkpoint 64, config 96 (checkpoint.load holds another "
        "architecture)"
    ]


def test_finetune_may_change_lr_seed_and_batch(saved, ckpt):
    overrides = ("training.seed=8", "optimizer.lr=0.02", "training.global_batch_size=8")
    assert _problems(saved, ckpt, "checkpoint.finetune=true", *overrides) == []


@pytest.mark.parametrize(
    "override, line",
    [
        ("training.seed=8", "training.seed: checkpoint 7, config 8"),
        ("optimizer.lr=0.02", "optimizer.lr: checkpoint 0.01, config 0.02"),
        ("training.global_batch_size=8", "training.global_batch_size: checkpoint 4, config 8"),
        ("training.micro_batch_size=1", "training.micro_batch_size: checkpoint 2, config 1"),
    ],
)
def test_changed_resume_settings_are_refused_unless_allowed(saved, ckpt, override, line):
    (problem,) = _problems(saved, ckpt, override)
    assert problem == (
        f"{line} (resume of {ckpt / TAG} refused: set checkpoint.allow_changes: true to accept "
        "the change)"
    )
    assert _problems(saved, ckpt, override, "checkpoint.allow_changes=true") == []


def test_changed_data_is_refused(saved, ckpt, tmp_path):
    other = tmp_path / "other"
    for suffix in (".bin", ".idx"):
        shutil.copy(saved[0].parent / f"corpus{suffix}", f"{other}{suffix}")
    (problem,) = _problems(saved, ckpt, f"data.train=[{{path: {other}}}]")
    assert problem.startswith("data.train: checkpoint [{'path': ")
    assert str(other) in problem and "checkpoint.allow_changes" in problem


def test_allow_changes_needs_a_resume(saved):
    with pytest.raises(
        ConfigError, match=r"checkpoint\.allow_changes: applies to a resume: needs checkpoint\.load"
    ):
        load_config([saved[0]], ["checkpoint.allow_changes=true"], world_size=1)


def test_missing_rng_file_of_a_complete_grid_is_a_rank_count_change(ckpt):
    tag = ckpt / TAG
    message = _missing_rng_message(tag, tag / "rng_state_rank1.pt", world=2)
    assert "was written by 1 ranks, this run has 2" in message


def test_missing_rng_file_listed_in_the_manifest_is_an_incomplete_save(ckpt):
    tag = ckpt / TAG
    (tag / "rng_state_rank0.pt").unlink()
    message = _missing_rng_message(tag, tag / "rng_state_rank0.pt", world=1)
    assert message.startswith(f"{tag / 'rng_state_rank0.pt'} is missing: incomplete save")


def _make_old(tag) -> None:
    """Turn a checkpoint into one saved before manifests: no manifest, no format key, and the
    RNG file in the old pickled-numpy form."""
    (tag / MANIFEST).unlink()
    client = json.loads((tag / "client_state.json").read_text())
    del client["format"]
    (tag / "client_state.json").write_text(json.dumps(client))
    new = torch.load(tag / "rng_state_rank0.pt", weights_only=True)
    random.seed(0), np.random.seed(0)
    torch.save(
        {**new, "python": random.getstate(), "numpy": np.random.get_state()},
        tag / "rng_state_rank0.pt",
    )


def test_old_checkpoint_without_manifest_is_verified_and_resumes(saved, ckpt):
    _make_old(ckpt / TAG)
    assert _problems(saved, ckpt) == []
    assert _problems(saved, ckpt, "model.num_layers=3")  # the config is still compared
    r = deepy(
        str(saved[0]),
        f"checkpoint.load={ckpt}",
        "checkpoint.allow_changes=true",
        "optimizer.lr=0.02",
        "training.train_iters=3",
        f"logging.dir={ckpt.parent / 'logs'}",
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"{ckpt / TAG} has no manifest.json (saved before manifests existed)" in out
    assert (
        "resume accepts a change (checkpoint.allow_changes): optimizer.lr: checkpoint 0.01, "
        "config 0.02"
    ) in out
    assert "step 3/3" in out


def test_deepy_refuses_a_truncated_checkpoint_before_launch(saved, ckpt):
    path = ckpt / TAG / MODEL
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:100])
    r = deepy(str(saved[0]), f"checkpoint.load={ckpt}")
    assert r.returncode == 2 and "nothing launched" in r.stderr
    assert f"{path} is truncated or changed: 100 bytes, the manifest says {size}" in r.stderr
    assert "Traceback" not in r.stderr
