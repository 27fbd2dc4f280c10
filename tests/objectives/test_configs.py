"""Objective configs: field checks (SectionError), YAML loading and ``check_config`` rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron.config import ConfigError, SectionError, load_config, save_config
from megatron.objectives.cpo import CPOConfig
from megatron.objectives.dpo import DPOConfig
from megatron.objectives.orpo import ORPOConfig
from megatron.objectives.simpo import SimPOConfig

BASE = """\
model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, vocab_size: 500,
        max_position_embeddings: 128}
data: {train: [{path: corpus}], seq_length: 32}
optimizer: {lr: 1e-3}
training: {train_iters: 10}
"""


def load(tmp_path: Path, text: str):
    base, run = tmp_path / "base.yml", tmp_path / "run.yml"
    base.write_text(BASE)
    run.write_text(text)
    return load_config([base, run], [])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss_weights": [1.0]}, r"loss_weights: has 1 entries but loss_type has 2"),
        ({"beta": 0.0}, r"beta: must be > 0 \(got 0.0\)"),
        ({"label_smoothing": 1.0}, r"label_smoothing: must be in \[0, 1\)"),
        ({"loss_type": ["hinge"], "label_smoothing": 0.1}, r"is used by none of loss_type"),
        ({"loss_type": ["robust"], "label_smoothing": 0.5}, r"must be < 0.5 for robust"),
        ({"loss_type": ["exo_pair"]}, r"must be > 0 for exo_pair"),
        (
            {"loss_type": ["sigmoid", "bco_pair"], "f_divergence_type": "js_divergence"},
            r"f_divergence_type: 'js_divergence' has no valid generalisation .*bco_pair",
        ),
        ({"loss_type": ["aot"], "use_weighting": True}, r"use_weighting: is not defined for aot"),
        ({"ld_alpha": 1.5}, r"ld_alpha: must be in \[0, 1\] or null"),
        ({"discopop_tau": 0.0}, r"discopop_tau: must be > 0"),
        ({"loss_type": "sigmoid"}, r"loss_type: must be a non-empty list"),
        ({"loss_type": []}, r"loss_type: must be a non-empty list"),
        ({"loss_type": ["sigmoidd"]}, r"loss_type: unknown \['sigmoidd'\]"),
    ],
)
def test_dpo_config_errors(kwargs, match):
    kwargs.setdefault("loss_type", ["sigmoid", "sft"])
    with pytest.raises(SectionError, match=match):
        DPOConfig(**kwargs)


def test_dpo_config_reports_every_problem_at_once():
    with pytest.raises(SectionError) as info:
        DPOConfig(beta=-1.0, discopop_tau=0.0, ld_alpha=2.0)
    assert [name for name, _ in info.value.fields] == ["beta", "ld_alpha", "discopop_tau"]


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (CPOConfig, {"beta": 0.0}, r"beta: must be > 0"),
        (CPOConfig, {"label_smoothing": 0.6}, r"label_smoothing: must be in \[0, 0.5\]"),
        (CPOConfig, {"loss_type": "ipo", "label_smoothing": 0.1}, r"not used by loss_type 'ipo'"),
        (CPOConfig, {"cpo_alpha": -1.0}, r"cpo_alpha: must be >= 0"),
        (CPOConfig, {"loss_type": "alphapo"}, r"loss_type: unknown 'alphapo'"),
        (SimPOConfig, {"beta": -0.1}, r"beta: must be > 0"),
        (ORPOConfig, {"beta": -0.1}, r"beta: must be >= 0"),
    ],
)
def test_pairwise_config_errors(cls, kwargs, match):
    with pytest.raises(SectionError, match=match):
        cls(**kwargs)


def test_dpo_loads_from_yaml(tmp_path):
    cfg = load(
        tmp_path,
        "objective: {name: dpo, beta: 0.05, loss_type: [sigmoid, sft], loss_weights: [1, 0.2]}\n",
    )
    assert cfg.objective.params == DPOConfig(
        beta=0.05, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2]
    )


def test_yaml_errors_name_file_and_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "objective: {name: dpo, loss_type: [sigmod], f_divergence_type: kl}\n")
    text = "\n".join(info.value.problems)
    assert "run.yml: objective.loss_type[0]: must be one of 'sigmoid'" in text
    assert "did you mean 'sigmoid'?" in text
    assert "run.yml: objective.f_divergence_type: must be one of 'reverse_kl'" in text
    with pytest.raises(ConfigError, match=r"objective\.beta: must be > 0"):
        load(tmp_path, "objective: {name: dpo, beta: 0}\n")
    with pytest.raises(ConfigError, match=r"objective\.loss_type: expected a list"):
        load(tmp_path, "objective: {name: dpo, loss_type: sigmoid}\n")


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_needs_two_pairs_per_micro_batch(tmp_path, loss_type):
    with pytest.raises(ConfigError, match=r"training\.micro_batch_size \(1\) must be >= 2"):
        load(tmp_path, f"objective: {{name: dpo, loss_type: [{loss_type}]}}\n")
    cfg = load(
        tmp_path,
        f"objective: {{name: dpo, loss_type: [{loss_type}]}}\ntraining: {{micro_batch_size: 2}}\n",
    )
    assert cfg.objective.params.loss_type == [loss_type]


@pytest.mark.parametrize(
    "text",
    [
        "objective: {name: sft, reduction: sequence_mean}\n",
        "objective: {name: cpo, loss_type: simpo, cpo_alpha: 0}\n",
        "objective: {name: simpo, beta: 2.0, simpo_gamma: 1.0}\n",
        "objective: {name: orpo, beta: 0.2}\n",
    ],
)
def test_other_objectives_load(tmp_path, text):
    assert load(tmp_path, text).objective.params is not None


def test_resolved_config_round_trips(tmp_path):
    text = (
        "objective: {name: dpo, loss_type: [robust, sft], loss_weights: [1, 0.5],\n"
        "            label_smoothing: 0.1, ld_alpha: 0.4, f_divergence_type: js_divergence}\n"
    )
    cfg = load(tmp_path, text)
    save_config(cfg, tmp_path / "resolved.yml")
    again = load_config([tmp_path / "resolved.yml"], resolved=True)
    assert again.objective == cfg.objective
