"""Cross-section rules: each rule has a pytest.raises(ConfigError, match=...) test."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron.config import ConfigError, RunConfig, load_config, validate_config
from megatron.objectives.registry import get_objective

BASE = """\
model:
  num_layers: 4
  hidden_size: 64
  num_attention_heads: 8
  vocab_size: 500
  max_position_embeddings: 128
data:
  train: [{path: corpus}]
  seq_length: 32
optimizer:
  lr: 1e-3
training:
  train_iters: 10
"""


def load(
    tmp_path: Path, extra: str = "", overrides: tuple[str, ...] = (), world_size: int | None = None
) -> RunConfig:
    base = tmp_path / "base.yml"
    base.write_text(BASE)
    run = tmp_path / "run.yml"
    run.write_text(extra)
    return load_config([base, run], list(overrides), world_size)


def test_valid_config_has_no_problems(tmp_path):
    cfg = load(tmp_path, "parallel: {tensor: 2, pipeline: 2}\n", world_size=8)
    assert validate_config(cfg, 8) == []
    assert validate_config(cfg) == []


def test_heads_divisible_by_tensor(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"run\.yml: model\.num_attention_heads \(6\) must be divisible by parallel\.tensor \(4\)",
    ):
        load(
            tmp_path,
            "model: {num_attention_heads: 6, hidden_size: 48}\nparallel: {tensor: 4}\n",
            world_size=4,
        )


def test_kv_heads_divisible_by_tensor(tmp_path):
    with pytest.raises(
        ConfigError, match=r"model\.num_kv_heads \(2\) must be divisible by parallel\.tensor \(4\)"
    ):
        load(tmp_path, "model: {num_kv_heads: 2}\nparallel: {tensor: 4}\n", world_size=4)


def test_heads_divisible_by_kv_heads(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"model\.num_attention_heads \(8\) must be divisible by model\.num_kv_heads \(3\)",
    ):
        load(tmp_path, "model: {num_kv_heads: 3}\n")


def test_hidden_divisible_by_heads(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"model\.hidden_size \(60\) must be divisible by model\.num_attention_heads \(8\)",
    ):
        load(tmp_path, "model: {hidden_size: 60, ffn_hidden_size: 240}\n")


def test_ffn_divisible_by_tensor(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"model\.ffn_hidden_size \(130\) must be divisible by parallel\.tensor \(4\)",
    ):
        load(tmp_path, "model: {ffn_hidden_size: 130}\nparallel: {tensor: 4}\n", world_size=4)


def test_world_size_equals_tp_pp_dp(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"world size \(6\) must equal parallel\.tensor \(4\) x parallel\.pipeline \(1\) x data parallel size \(1\)",
    ):
        load(tmp_path, "parallel: {tensor: 4}\n", world_size=6)


def test_world_size_rule_in_validate_config(tmp_path):
    cfg = load(tmp_path, world_size=2)
    assert validate_config(cfg, 2) == []
    assert validate_config(cfg, 3)[0].startswith("world size (3) must equal parallel.tensor (1)")


def test_global_batch_equals_micro_times_accumulation_times_dp(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"training\.global_batch_size \(10\) must equal training\.micro_batch_size \(2\) x "
        r"training\.gradient_accumulation_steps \(3\) x data parallel size \(2\) = 12",
    ):
        load(
            tmp_path,
            "training: {micro_batch_size: 2, gradient_accumulation_steps: 3, global_batch_size: 10}\n",
            world_size=2,
        )


def test_zero_2_refused_with_pipeline(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"run\.yml: parallel\.zero_stage \(2\) cannot be used with parallel\.pipeline \(2\) > 1: "
        r"DeepSpeed's pipeline engine supports ZeRO 0 and 1 only",
    ):
        load(tmp_path, "parallel: {zero_stage: 2, pipeline: 2}\n", world_size=2)


def test_zero_1_allowed_with_pipeline(tmp_path):
    cfg = load(tmp_path, "parallel: {zero_stage: 1, pipeline: 2}\n", world_size=4)
    assert cfg.parallel.data == 2


def test_layers_at_least_pipeline_stages(tmp_path):
    with pytest.raises(
        ConfigError, match=r"model\.num_layers \(4\) must be >= parallel\.pipeline \(8\)"
    ):
        load(tmp_path, "parallel: {pipeline: 8}\n", world_size=8)


def test_rotary_channels_even(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"model\.rotary_pct \(0\.3\) x model\.kv_channels \(8\) = 2\.4 rotary channels must be a positive even whole number",
    ):
        load(tmp_path, "model: {rotary_pct: 0.3}\n")
    with pytest.raises(
        ConfigError, match=r"= 3 rotary channels must be a positive even whole number"
    ):
        load(tmp_path, "model: {rotary_pct: 0.375}\n")
    assert load(tmp_path, "model: {rotary_pct: 0.25}\n").model.rotary_pct == 0.25


def test_seq_length_within_max_positions(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"data\.seq_length \(256\) must be <= model\.max_position_embeddings \(128\)",
    ):
        load(tmp_path, "data: {seq_length: 256}\n")


def test_llama3_original_context_within_max_positions(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"model\.rope_scaling\.original_max_position_embeddings \(8192\) must be <= model\.max_position_embeddings \(128\)",
    ):
        load(tmp_path, "model: {rope_scaling: {type: llama3, factor: 8}}\n")


def test_precision_choices(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"training\.precision: must be one of 'fp32', 'bf16', 'fp16' \(got string 'bfloat16'\)",
    ):
        load(tmp_path, "training: {precision: bfloat16}\n")


def test_min_lr_at_most_lr(tmp_path):
    with pytest.raises(
        ConfigError, match=r"schedule\.min_lr \(0\.01\) must be <= optimizer\.lr \(0\.001\)"
    ):
        load(tmp_path, "schedule: {min_lr: 0.01}\n")


def test_warmup_within_decay(tmp_path):
    with pytest.raises(
        ConfigError, match=r"schedule\.warmup_iters \(20\) must be <= schedule\.decay_iters \(10\)"
    ):
        load(tmp_path, "schedule: {warmup_iters: 20}\n")


def test_eval_interval_needs_valid_data(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.eval_interval \(5\) needs data\.valid"):
        load(tmp_path, "training: {eval_interval: 5}\n")
    cfg = load(tmp_path, "training: {eval_interval: 5}\ndata: {valid: [{path: held_out}]}\n")
    assert cfg.data.valid[0].path == "held_out"


def test_eval_iters_positive(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.eval_iters: must be >= 1 \(got 0\)"):
        load(tmp_path, "training: {eval_iters: 0}\n")


def test_rule_problem_blames_file_of_first_named_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "", overrides=("data.seq_length=512",))
    assert info.value.problems == [
        "<override>: data.seq_length (512) must be <= model.max_position_embeddings (128)"
    ]


def test_several_rules_reported_together(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(
            tmp_path,
            "parallel: {tensor: 3}\nschedule: {min_lr: 1.0}\ndata: {seq_length: 999}\n",
            world_size=3,
        )
    assert len(info.value.problems) == 5  # heads, kv heads, ffn (256) by tensor 3; seq; min_lr


def test_objective_check_config_messages_are_reported(tmp_path, monkeypatch):
    objective = get_objective("lm")
    monkeypatch.setattr(
        objective,
        "check_config",
        classmethod(
            lambda cls, cfg: [
                f"training.micro_batch_size ({cfg.training.micro_batch_size}) must be even"
            ]
        ),
    )
    with pytest.raises(
        ConfigError, match=r"<config>: training\.micro_batch_size \(1\) must be even"
    ):
        load(tmp_path)
    with pytest.raises(
        ConfigError, match=r"run\.yml: training\.micro_batch_size \(3\) must be even"
    ):
        load(tmp_path, "training: {micro_batch_size: 3}\n")


def test_validate_config_tolerates_unresolved_batch_sizes(tmp_path):
    cfg = load(tmp_path)
    unresolved = dataclasses.replace(
        cfg,
        training=dataclasses.replace(
            cfg.training, gradient_accumulation_steps=None, global_batch_size=None
        ),
    )
    assert validate_config(unresolved) == []


def test_bf16_needs_zero_1_or_more(tmp_path):
    with pytest.raises(
        ConfigError, match=r"training\.precision \(bf16\) needs parallel\.zero_stage >= 1"
    ):
        load(tmp_path, "training: {precision: bf16}\nparallel: {zero_stage: 0}\n")


# ----------------------------------------------------------------------------- reference
def test_reference_auto_resolves_from_the_objective(tmp_path):
    from megatron.config.validate import reference_source

    assert reference_source(load(tmp_path, "objective: {name: dpo}\n")) == "model"
    assert (
        reference_source(load(tmp_path, "objective: {name: dpo, reference_free: true}\n")) == "none"
    )
    assert reference_source(load(tmp_path, "objective: {name: simpo}\n")) == "none"
    cached = load(tmp_path, "objective: {name: dpo}\nreference: {cache: refs/}\n")
    assert reference_source(cached) == "cache"


def test_objective_needing_a_reference_refuses_none(tmp_path):
    with pytest.raises(
        ConfigError, match=r"reference\.source \(none\): objective 'dpo' needs reference"
    ):
        load(tmp_path, "objective: {name: dpo}\nreference: {source: none}\n")


def test_reference_for_a_reference_free_objective_is_refused(tmp_path):
    with pytest.raises(
        ConfigError, match=r"reference\.source \(model\): objective 'simpo' .* uses no"
    ):
        load(tmp_path, "objective: {name: simpo}\nreference: {source: model}\n")


def test_reference_model_with_pipeline_is_refused(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"reference\.source \(model\) cannot be used with parallel\.pipeline \(2\)",
    ):
        load(tmp_path, "objective: {name: dpo}\nparallel: {pipeline: 2}\n")


def test_reference_cache_needs_a_path(tmp_path):
    with pytest.raises(
        ConfigError, match=r"reference\.cache: must be set when reference\.source is 'cache'"
    ):
        load(tmp_path, "objective: {name: dpo}\nreference: {source: cache}\n")


def test_reference_load_only_with_a_model(tmp_path):
    with pytest.raises(
        ConfigError, match=r"reference\.load is only used with reference\.source 'model'"
    ):
        load(tmp_path, "objective: {name: dpo}\nreference: {source: cache, cache: x, load: y}\n")


def test_prefix_shared_layout_needs_pair_batches(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"data\.layout \(prefix_shared\) needs an objective with pair batches .* "
        r"objective 'sft' reads 'sequence' batches",
    ):
        load(tmp_path, "objective: {name: sft}\ndata: {layout: prefix_shared}\n")
    cfg = load(tmp_path, "objective: {name: simpo}\ndata: {layout: prefix_shared}\n")
    assert cfg.data.layout == "prefix_shared" and validate_config(cfg) == []


def test_prefix_shared_layout_accepts_every_attention_backend(tmp_path):
    """flash-attn realises prefix sharing by varlen key gathering (megatron.model.attention)."""
    for backend in ("flash", "auto", "sdpa"):
        text = (
            "objective: {name: simpo}\ndata: {layout: prefix_shared}\n"
            f"model: {{attention_backend: {backend}}}\n"
        )
        assert validate_config(load(tmp_path, text)) == []


def test_prefix_shared_layout_works_with_pipeline_parallelism(tmp_path):
    """Pipeline messages carry the extra targets (megatron/data/batch.py pipeline_inputs)."""
    cfg = "objective: {name: simpo}\ndata: {layout: prefix_shared}\nparallel: {pipeline: 2}\n"
    assert validate_config(load(tmp_path, cfg)) == []


@pytest.mark.parametrize(
    ("extra", "want"),
    [
        ("objective: {name: dpo}\n", "prefix_shared_packed"),
        ("objective: {name: reward}\nmodel: {head: value}\n", "prefix_shared_packed"),
        ("objective: {name: sft}\n", "padded"),
        ("objective: {name: kto}\n", "padded"),
        ("objective: {name: dpo}\nmodel: {attention_backend: flash}\n", "prefix_shared_packed"),
        ("objective: {name: dpo}\ndata: {layout: packed}\n", "packed"),
    ],
)
def test_data_layout_auto_resolves_at_load(tmp_path, extra, want):
    """data.layout: auto (the default) is the fastest exact layout measured: prefix_shared_packed
    for pair objectives (any attention backend), padded otherwise; explicit values stay."""
    assert load(tmp_path, extra).data.layout == want
