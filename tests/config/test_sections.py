"""Section checks (``__post_init__`` of megatron/config/sections.py), through the loader: each
bad field is named with its value, every field of a section at once."""

from __future__ import annotations

import dataclasses

import pytest

from megatron.config import ConfigError
from tests.config.test_loader import load, problems


def test_positive_int_check_names_field_and_value(tmp_path):
    with pytest.raises(
        ConfigError, match=r"extra0\.yml: model\.num_layers: must be >= 1 \(got 0\)"
    ):
        load(tmp_path, "model: {num_layers: 0}\n")


def test_section_checks_report_every_field(tmp_path):
    found = problems(
        tmp_path, "training: {micro_batch_size: 0, eval_iters: 0}\nlogging: {log_interval: 0}\n"
    )
    assert len(found) == 3


def test_sequence_parallel_is_not_implemented(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel\.sequence_parallel: not implemented yet"):
        load(tmp_path, "parallel: {sequence_parallel: true}\n")


def test_betas_need_two_values_in_range(tmp_path):
    with pytest.raises(
        ConfigError, match=r"optimizer\.betas: must hold exactly 2 values \(got 3\)"
    ):
        load(tmp_path, "optimizer: {betas: [0.9, 0.95, 0.99]}\n")
    with pytest.raises(ConfigError, match=r"optimizer\.betas: each beta must be in \[0, 1\)"):
        load(tmp_path, "optimizer: {betas: [0.9, 1.0]}\n")


def test_warmup_iters_and_fraction_exclusive(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"schedule\.warmup_fraction: set warmup_iters or warmup_fraction, not both",
    ):
        load(tmp_path, "schedule: {warmup_iters: 2, warmup_fraction: 0.1}\n")


@pytest.mark.parametrize("fraction", ["1.0", "-0.1"])
def test_warmup_fraction_in_unit_interval(tmp_path, fraction):
    with pytest.raises(ConfigError, match=r"schedule\.warmup_fraction: must be in \[0, 1\)"):
        load(tmp_path, f"schedule: {{warmup_fraction: {fraction}}}\n")


def test_save_interval_needs_save(tmp_path):
    with pytest.raises(
        ConfigError, match=r"checkpoint\.save_interval: \(5\) needs checkpoint\.save to be set"
    ):
        load(tmp_path, "checkpoint: {save_interval: 5}\n")


def test_finetune_needs_load(tmp_path):
    with pytest.raises(
        ConfigError, match=r"checkpoint\.finetune: needs checkpoint\.load to be set"
    ):
        load(tmp_path, "checkpoint: {finetune: true}\n")


def test_data_weight_positive_and_blend_not_empty(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train\[0\]\.weight: must be > 0 \(got 0.0\)"):
        load(tmp_path, "data: {train: [{path: a, weight: 0}]}\n")
    with pytest.raises(ConfigError, match=r"data\.train: must list at least one dataset"):
        load(tmp_path, "data: {train: []}\n")


def test_launcher_checks(tmp_path):
    found = problems(
        tmp_path, "launcher: {num_nodes: 2, node_rank: 2, hostfile: hosts, master_port: 0}\n"
    )
    assert any("launcher.node_rank: must be in [0, num_nodes=2) (got 2)" in p for p in found)
    assert any("launcher.hostfile: is only used by launcher.type 'deepspeed'" in p for p in found)
    assert any("launcher.master_port: must be in [1, 65535]" in p for p in found)


def test_rope_scaling_llama3_needs_high_above_low(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"model\.rope_scaling\.high_freq_factor: \(1\.0\) must be > low_freq_factor \(2\.0\)",
    ):
        load(
            tmp_path,
            "model: {rope_scaling: {type: llama3, factor: 8, low_freq_factor: 2, high_freq_factor: 1}}\n",
        )


def test_sections_are_frozen(tmp_path):
    cfg = load(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.hidden_size = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training = cfg.training  # type: ignore[misc]
