"""Checkpoint files are loaded with ``weights_only=True``: a crafted pickle runs no code.

The crafted file's ``__reduce__`` would create a marker file (``open(marker, "w")``); for every
path that reads checkpoints (finetune, ``reference.load``, conversion, scoring, ZeRO-3's
``zero_to_fp32``, a resume's DeepSpeed files and RNG files) the load is refused with the file
named, and the marker never appears. DeepSpeed's real ZeRO-1 files and old-format RNG files
still load; a truncated shard is named with its size.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from megatron.ckpt import ConversionError
from megatron.ckpt.convert import convert_native_to_hf
from megatron.ckpt.layout import CheckpointError
from megatron.ckpt.native import load_tp_shard, read_model_shard
from megatron.ckpt.safety import (
    NUMPY_GLOBALS,
    UnsafeCheckpointError,
    check_loadable,
    safe_load,
    torch_files,
)
from megatron.config import config_to_dict, load_config
from megatron.model import GPTModel
from megatron.parallel.random import RNGStatesTracker
from megatron.parallel.state import ParallelState
from megatron.training import checkpointing
from tests.training.ckpt_helpers import save_tiny_checkpoint


class Evil:
    """Unpickling this creates ``marker`` (what a crafted checkpoint could do instead)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    cfg_path, ckpt = save_tiny_checkpoint(tmp)
    return cfg_path, ckpt / "iter_0000002"


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the crafted checkpoint ran code on load"


def _crafted(tmp: Path, saved_tag: Path, name: str, marker: Path, head: str = "lm") -> Path:
    """A copy of the saved checkpoint whose ``name`` is replaced by a crafted pickle."""
    tag = tmp / "crafted" / saved_tag.name
    shutil.copytree(saved_tag, tag)
    (tag.parent / "latest").write_text(tag.name + "\n")
    if head != "lm":
        config = yaml.safe_load((tag / "config.yml").read_text())
        config["model"]["head"] = head
        (tag / "config.yml").write_text(yaml.safe_dump(config))
    payload = {"module": {"embedding.weight": Evil(marker)}, "mp_world_size": 1}
    if name.startswith("rng"):
        payload = {"python": Evil(marker)}
    torch.save(payload, tag / name)
    return tag


MODEL = "mp_rank_00_model_states.pt"


def test_real_deepspeed_files_load_with_the_allowlist(saved):
    _, tag = saved
    names = torch.serialization.get_unsafe_globals_in_checkpoint(
        tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    )
    assert names and all(n.startswith("deepspeed.") for n in names)  # the allowlist is exercised
    check_loadable(torch_files(tag))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tag / "rng_state_rank0.pt") == []


def test_crafted_model_file_is_refused_by_the_finetune_path(saved, tmp_path, marker):
    cfg_path, tag = saved
    bad = _crafted(tmp_path, tag, MODEL, marker)
    cfg = load_config([cfg_path], world_size=1)
    engine = SimpleNamespace(module=GPTModel(cfg.model, ParallelState.single()))
    with pytest.raises(CheckpointError, match=rf"{MODEL}: refused to load: .*io\.open"):
        checkpointing.load_weights(engine, bad)


def test_crafted_model_file_is_refused_by_reference_load(saved, tmp_path, marker):
    from megatron.training.reference import ReferenceModel

    cfg_path, tag = saved
    bad = _crafted(tmp_path, tag, MODEL, marker)
    cfg = load_config([cfg_path], world_size=1)
    with pytest.raises(ConversionError, match=rf"{MODEL}: refused to load"):
        ReferenceModel(cfg, ParallelState.single(), torch.device("cpu"), str(bad))


def test_crafted_model_file_is_refused_by_conversion(saved, tmp_path, marker):
    _, tag = saved
    bad = _crafted(tmp_path, tag, MODEL, marker)
    config = yaml.safe_load((bad / "config.yml").read_text())
    with pytest.raises(ConversionError, match=rf"{MODEL}: refused to load"):
        convert_native_to_hf(bad, tmp_path / "hf", config=config)


def test_crafted_model_file_is_refused_by_scoring(saved, tmp_path, marker):
    from megatron.scoring import NativeRewardModel, ScoreError

    _, tag = saved
    bad = _crafted(tmp_path, tag, MODEL, marker, head="value")
    with pytest.raises(ScoreError, match=rf"{MODEL}: refused to load"):
        NativeRewardModel(bad)


def test_crafted_zero_partition_is_refused_before_zero_to_fp32(saved, tmp_path, marker):
    _, tag = saved
    bad = _crafted(tmp_path, tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(ConversionError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt"):
        read_model_shard(bad, 0, fp32_master=True)


@pytest.mark.parametrize(
    "name", ["rng_state_rank0.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
)
def test_crafted_file_is_refused_before_deepspeed_resumes(saved, tmp_path, marker, name):
    _, tag = saved
    bad = _crafted(tmp_path, tag, name, marker)
    called = []
    engine = SimpleNamespace(load_checkpoint=lambda *a, **k: called.append(1) or (None, None))
    with pytest.raises(UnsafeCheckpointError, match=rf"{name}: refused to load: .*io\.open"):
        checkpointing.load_checkpoint(engine, bad, False, RNGStatesTracker())
    assert not called  # DeepSpeed (weights_only=False) never saw the file


def test_crafted_rng_file_is_refused(tmp_path, marker):
    path = tmp_path / "rng_state_rank0.pt"
    torch.save({"python": Evil(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"rng_state_rank0\.pt: refused to load"):
        safe_load(path, allowed=NUMPY_GLOBALS)


def test_rng_state_round_trips_as_plain_data(tmp_path):
    tracker = RNGStatesTracker()
    tracker.add("model-parallel-rng", 5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(checkpointing.rng_state(tracker), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpointing.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), tracker)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_old_format_rng_file_still_loads(tmp_path):
    tracker = RNGStatesTracker()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    old = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tracker.state_dict(),
    }
    torch.save(old, tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpointing.set_rng_state(safe_load(tmp_path / "rng.pt", allowed=NUMPY_GLOBALS), tracker)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_truncated_shard_is_named_with_its_size(saved, tmp_path):
    cfg_path, tag = saved
    bad = tmp_path / tag.name
    shutil.copytree(tag, bad)
    data = (bad / MODEL).read_bytes()
    (bad / MODEL).write_bytes(data[: len(data) // 2])
    cfg = load_config([cfg_path], world_size=1)
    with pytest.raises(ConversionError, match=rf"{MODEL}: cannot be read \({len(data) // 2} bytes"):
        load_tp_shard(bad, cfg.model, 1, 0)


def test_converted_checkpoint_config_is_plain_data(saved):
    # the saved config.yml is what checkpoint_verify compares against
    cfg_path, tag = saved
    saved_model = yaml.safe_load((tag / "config.yml").read_text())["model"]
    assert saved_model == config_to_dict(load_config([cfg_path], world_size=1).model)
    assert json.loads((tag / "client_state.json").read_text())["format"] == 2
