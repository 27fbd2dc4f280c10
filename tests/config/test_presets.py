"""Every model preset and the tiny example run load and validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron.config import deepspeed_config, load_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs" / "models").glob("*.yml"))
TINY_RUN = ROOT / "configs" / "tiny.yml"


def test_expected_presets_exist():
    names = {p.stem for p in PRESETS}
    expected = {
        "tiny", "pythia-160m", "pythia-410m", "pythia-1b", "pythia-1.4b", "pythia-2.8b",
        "pythia-6.9b", "pythia-12b", "llama2-7b", "llama2-13b", "llama3-8b", "llama3.1-8b",
        "llama3-70b", "mistral-7b", "qwen2-7b",
    }  # fmt: skip
    assert expected <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_holds_only_a_model_section(preset):
    assert list(yaml.safe_load(preset.read_text())) == ["model"]


def _cases() -> list[tuple[Path, int]]:
    cases = []
    for preset in PRESETS:
        model = yaml.safe_load(preset.read_text())["model"]
        heads = model["num_attention_heads"]
        kv_heads = model.get("num_kv_heads") or heads
        cases += [(preset, tp) for tp in (1, 2, 4) if heads % tp == 0 and kv_heads % tp == 0]
    return cases


@pytest.mark.parametrize(
    "preset,tp", _cases(), ids=lambda v: v.stem if isinstance(v, Path) else f"tp{v}"
)
def test_preset_loads_with_tiny_run(preset, tp):
    cfg = load_config([preset, TINY_RUN], [f"parallel.tensor={tp}"], world_size=tp)
    assert cfg.parallel.tensor == tp and cfg.parallel.data == 1
    assert cfg.model.padded_vocab_size % (cfg.model.make_vocab_size_divisible_by * tp) == 0
    assert deepspeed_config(cfg)["train_batch_size"] == cfg.training.global_batch_size


@pytest.mark.parametrize(
    "name,padded",
    [("pythia-160m", 50304), ("pythia-2.8b", 50304), ("pythia-6.9b", 50432), ("pythia-12b", 50688),
     ("llama2-7b", 32000), ("llama3-8b", 128256), ("mistral-7b", 32000), ("qwen2-7b", 152064)],
)  # fmt: skip
def test_padded_vocab_matches_published_embeddings(name, padded):
    cfg = load_config([ROOT / "configs" / "models" / f"{name}.yml", TINY_RUN], world_size=1)
    assert cfg.model.padded_vocab_size == padded


def test_published_shapes():
    def model(name):
        return load_config([ROOT / "configs" / "models" / f"{name}.yml", TINY_RUN]).model

    assert model("pythia-160m").kv_channels * 0.25 == 16  # 16 rotary channels per head
    assert model("llama2-7b").ffn_hidden_size == 11008
    assert (model("llama3-8b").num_kv_heads, model("llama3-8b").rotary_base) == (8, 500000.0)
    scaling = model("llama3.1-8b").rope_scaling
    assert (scaling.type, scaling.factor, scaling.original_max_position_embeddings) == (
        "llama3",
        8.0,
        8192,
    )
    assert model("mistral-7b").sliding_window == 4096
    qwen = model("qwen2-7b")
    assert (qwen.qkv_bias, qwen.proj_bias, qwen.num_kv_heads, qwen.kv_channels) == (
        True,
        False,
        4,
        128,
    )


def test_tiny_run():
    cfg = load_config([ROOT / "configs" / "models" / "tiny.yml", TINY_RUN])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_kv_heads) == (64, 2, 2)
    assert cfg.model.ffn_hidden_size == 256  # SwiGLU default for h = 64
    assert cfg.data.seq_length == 64 and cfg.training.train_iters == 20
    assert cfg.training.micro_batch_size == 2 and cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.schedule.style == "cosine" and cfg.logging.log_interval == 5
    assert cfg.checkpoint.save == "runs/tiny" and cfg.logging.dir == "runs/tiny"
    assert cfg.data.train[0].path == "runs/data/tiny_text"
