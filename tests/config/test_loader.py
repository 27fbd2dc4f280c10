"""Loader: merging, overrides, type conversion, error collection, derived values, save/load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from megatron.config import (
    ConfigError,
    ModelConfig,
    RunConfig,
    config_to_dict,
    deepspeed_config,
    load_config,
    save_config,
)

BASE = """\
model:
  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
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


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, *extra: str, overrides: tuple[str, ...] = (), **kwargs) -> RunConfig:
    """Load BASE followed by each text in ``extra`` (as files extra0.yml, extra1.yml, ...)."""
    paths = [write(tmp_path, "base.yml", BASE)]
    paths += [write(tmp_path, f"extra{i}.yml", text) for i, text in enumerate(extra)]
    return load_config(paths, list(overrides), **kwargs)


def problems(tmp_path: Path, *extra: str, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, *extra, **kwargs)
    return info.value.problems


# ----------------------------------------------------------------------------- merging and overrides
def test_minimal_config_loads_with_defaults(tmp_path):
    cfg = load(tmp_path)
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.optimizer.betas == [0.9, 0.95]
    assert cfg.objective.name == "lm"
    assert cfg.objective.params.z_loss == 0.0
    assert cfg.parallel.data == 1
    assert cfg.logging.dir == "runs/default"
    assert cfg.schedule.decay_iters == 10


def test_later_files_deep_merge_and_lists_replace(tmp_path):
    cfg = load(
        tmp_path,
        "model: {hidden_size: 128}\ndata: {train: [{path: a, weight: 2}, {path: b}]}\n",
        "optimizer: {betas: [0.8, 0.9]}\n",
    )
    assert cfg.model.hidden_size == 128 and cfg.model.num_layers == 2
    assert [(s.path, s.weight) for s in cfg.data.train] == [("a", 2.0), ("b", 1.0)]
    assert cfg.optimizer.betas == [0.8, 0.9]


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load(
        tmp_path,
        "checkpoint: {load: ckpt, save: out}\n",
        overrides=(
            "training.train_iters=50",
            "optimizer.betas=[0.9,0.99]",
            "checkpoint.load=null",
            "optimizer.lr=2e-4",
            "model.rope_scaling={type: linear, factor: 2}",
            "logging.wandb = true",
        ),
    )
    assert cfg.training.train_iters == 50
    assert cfg.optimizer.betas == [0.9, 0.99]
    assert cfg.checkpoint.load is None and cfg.checkpoint.save == "out"
    assert cfg.optimizer.lr == pytest.approx(2e-4)
    assert cfg.model.rope_scaling.type == "linear" and cfg.model.rope_scaling.factor == 2.0
    assert cfg.logging.wandb is True


def test_override_without_equals_is_reported(tmp_path):
    with pytest.raises(
        ConfigError, match=r"<override>: 'training\.train_iters': expected dotted\.key=value"
    ):
        load(tmp_path, overrides=("training.train_iters",))


def test_override_unknown_key_is_reported_with_override_source(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"<override>: training\.train_iter: unknown key 'train_iter'; did you mean 'train_iters'\?",
    ):
        load(tmp_path, overrides=("training.train_iter=5",))


def test_override_bad_value_type(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"<override>: training\.train_iters: expected an integer, got string 'ten'",
    ):
        load(tmp_path, overrides=("training.train_iters=ten",))


def test_override_invalid_yaml_value(tmp_path):
    with pytest.raises(ConfigError, match=r"<override>: optimizer\.betas: invalid YAML value"):
        load(tmp_path, overrides=("optimizer.betas=[0.9,",))


def test_single_path_is_accepted(tmp_path):
    cfg = load_config(write(tmp_path, "base.yml", BASE))
    assert cfg.model.num_layers == 2


def test_empty_section_and_empty_file_are_fine(tmp_path):
    cfg = load(tmp_path, "logging:\n", "")
    assert cfg.logging.log_interval == 10


# ----------------------------------------------------------------------------- file-level errors
def test_malformed_yaml_names_the_line(tmp_path):
    bad = write(
        tmp_path, "bad.yml", "model:\n  num_layers: 2\n  hidden_size: [64\n  vocab_size: 5\n"
    )
    with pytest.raises(ConfigError, match=re.escape(f"{bad}:4: invalid YAML")):
        load_config([bad])


def test_malformed_yaml_bad_indentation_names_the_line(tmp_path):
    bad = write(tmp_path, "bad.yml", "model:\n  num_layers: 2\n hidden_size: 64\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}:3: invalid YAML")):
        load_config([bad])


def test_duplicate_key_is_an_error(tmp_path):
    bad = write(tmp_path, "dup.yml", "training:\n  train_iters: 1\n  train_iters: 2\n")
    with pytest.raises(
        ConfigError, match=re.escape(f"{bad}:3: invalid YAML: duplicate key 'train_iters'")
    ):
        load_config([bad])


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: config file not found")):
        load_config([write(tmp_path, "base.yml", BASE), missing])


def test_top_level_must_be_a_mapping(tmp_path):
    bad = write(tmp_path, "list.yml", "- model\n- data\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: the top level must be a mapping")):
        load_config([bad])


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(
        ConfigError, match=r"extra0\.yml: training: expected a mapping, got integer 5"
    ):
        load(tmp_path, "training: 5\n")


# ----------------------------------------------------------------------------- keys and types
def test_unknown_key_did_you_mean(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"extra0\.yml: model\.hiden_size: unknown key 'hiden_size'; did you mean 'hidden_size'\?",
    ):
        load(tmp_path, "model: {hiden_size: 3}\n")


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown key 'zzz'; valid keys: save, save_interval, load"
    ):
        load(tmp_path, "checkpoint: {zzz: 1}\n")


def test_unknown_section_did_you_mean(tmp_path):
    with pytest.raises(
        ConfigError, match=r"trainig: unknown section 'trainig'; did you mean 'training'\?"
    ):
        load(tmp_path, "trainig: {train_iters: 3}\n")


def test_missing_required_key(tmp_path):
    paths = [write(tmp_path, "x.yml", BASE.replace("  seq_length: 32\n", ""))]
    with pytest.raises(ConfigError, match=r"<config>: data\.seq_length: missing required key"):
        load_config(paths)


def test_missing_required_key_in_list_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train\[1\]\.path: missing required key"):
        load(tmp_path, "data: {train: [{path: a}, {weight: 2}]}\n")


def test_int_field_rejects_bool_float_and_string(tmp_path):
    found = problems(tmp_path, "model: {num_layers: true, hidden_size: 64.0, vocab_size: '500'}\n")
    assert any("model.num_layers: expected an integer, got boolean true" in p for p in found)
    assert any("model.hidden_size: expected an integer, got float 64.0" in p for p in found)
    assert any("model.vocab_size: expected an integer, got string '500'" in p for p in found)


def test_float_field_accepts_ints_and_numeric_strings(tmp_path):
    cfg = load(tmp_path, "optimizer: {lr: 1e-5, weight_decay: 1, eps: '1.0e-6'}\n")
    assert cfg.optimizer.lr == pytest.approx(1e-5) and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.weight_decay == 1.0 and isinstance(cfg.optimizer.weight_decay, float)
    assert cfg.optimizer.eps == pytest.approx(1e-6)


def test_float_field_rejects_bools_words_and_infinity(tmp_path):
    found = problems(tmp_path, "optimizer: {lr: true, eps: fast, weight_decay: .inf}\n")
    assert any("optimizer.lr: expected a number, got boolean true" in p for p in found)
    assert any("optimizer.eps: expected a number, got string 'fast'" in p for p in found)
    assert any("optimizer.weight_decay: must be a finite number" in p for p in found)


def test_bool_field_rejects_ints_and_strings(tmp_path):
    found = problems(tmp_path, "model: {qkv_bias: 1, mlp_bias: 'yes please'}\n")
    assert any(
        "model.qkv_bias: expected a boolean (true or false), got integer 1" in p for p in found
    )
    assert any("model.mlp_bias: expected a boolean (true or false), got string" in p for p in found)


def test_str_field_rejects_numbers(tmp_path):
    with pytest.raises(
        ConfigError, match=r"data\.tokenizer: expected a string or null, got integer 3"
    ):
        load(tmp_path, "data: {tokenizer: 3}\n")


def test_literal_lists_choices_and_suggests(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"model\.norm: must be one of 'layernorm', 'rmsnorm' \(got string 'rms_norm'\); did you mean 'rmsnorm'\?",
    ):
        load(tmp_path, "model: {norm: rms_norm}\n")


def test_int_literal_lists_choices_and_rejects_bool(tmp_path):
    with pytest.raises(
        ConfigError, match=r"parallel\.zero_stage: must be one of 0, 1, 2, 3 \(got integer 4\)"
    ):
        load(tmp_path, "parallel: {zero_stage: 4}\n")
    with pytest.raises(
        ConfigError, match=r"parallel\.zero_stage: must be one of 0, 1, 2, 3 \(got boolean true\)"
    ):
        load(tmp_path, "parallel: {zero_stage: true}\n")


def test_list_items_are_typed(tmp_path):
    with pytest.raises(
        ConfigError, match=r"optimizer\.betas\[1\]: expected a number, got string 'x'"
    ):
        load(tmp_path, "optimizer: {betas: [0.9, x]}\n")
    with pytest.raises(
        ConfigError,
        match=r"data\.train: expected a list of DataSource mappings|data\.train: expected a list",
    ):
        load(tmp_path, "data: {train: corpus}\n")


def test_nested_dataclass_is_typed(tmp_path):
    cfg = load(
        tmp_path,
        "model: {rope_scaling: {type: llama3, factor: '8', original_max_position_embeddings: 64}}\n",
    )
    assert cfg.model.rope_scaling.factor == 8.0
    assert cfg.model.rope_scaling.high_freq_factor == 4.0
    with pytest.raises(
        ConfigError,
        match=r"model\.rope_scaling\.fctor: unknown key 'fctor'; did you mean 'factor'\?",
    ):
        load(tmp_path, "model: {rope_scaling: {type: linear, fctor: 2}}\n")


def test_problem_names_the_file_that_set_the_key(tmp_path):
    found = problems(tmp_path, "model: {hidden_size: x}\n", "optimizer: {lr: y}\n")
    assert any(p.startswith(f"{tmp_path / 'extra0.yml'}: model.hidden_size:") for p in found)
    assert any(p.startswith(f"{tmp_path / 'extra1.yml'}: optimizer.lr:") for p in found)


def test_all_problems_reported_at_once(tmp_path):
    bad = "model: {hiden_size: 3}\noptimizer: {lr: fast}\nparallel: {zero_stage: 9}\n"
    with pytest.raises(ConfigError) as info:
        load(tmp_path, bad)
    assert len(info.value.problems) == 3
    message = str(info.value)
    assert message.startswith("3 problems in the run configuration:")
    for key in ("model.hiden_size", "optimizer.lr", "parallel.zero_stage"):
        assert key in message


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------------------------- objective section
def test_objective_params_are_flat(tmp_path):
    cfg = load(tmp_path, "objective: {name: lm, z_loss: '1e-4'}\n")
    assert cfg.objective.name == "lm"
    assert cfg.objective.params.z_loss == pytest.approx(1e-4)
    assert config_to_dict(cfg)["objective"] == {"name": "lm", "z_loss": pytest.approx(1e-4)}


def test_objective_unknown_param_did_you_mean(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"objective\.z_los: unknown key 'z_los' for objective 'lm'; did you mean 'z_loss'\?",
    ):
        load(tmp_path, "objective: {z_los: 0.1}\n")


def test_objective_param_type_checked(tmp_path):
    with pytest.raises(
        ConfigError, match=r"objective\.z_loss: expected a number, got string 'big'"
    ):
        load(tmp_path, "objective: {z_loss: big}\n")


def test_unknown_objective_lists_choices(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"objective\.name: unknown objective 'lmm'; did you mean 'lm'\? \(choices: .*lm",
    ):
        load(tmp_path, "objective: {name: lmm}\n")


# ----------------------------------------------------------------------------- derived values
def test_model_derived_values(tmp_path):
    cfg = load(tmp_path)
    assert cfg.model.kv_channels == 16
    assert cfg.model.num_kv_heads == 4
    assert cfg.model.ffn_hidden_size == 256  # 4h for gelu
    assert cfg.model.padded_vocab_size == 512  # 500 -> multiple of 128


def test_swiglu_ffn_default_follows_llama_rule(tmp_path):
    cfg = load(
        tmp_path, "model: {hidden_size: 4096, num_attention_heads: 32, activation: swiglu}\n"
    )
    assert cfg.model.ffn_hidden_size == 11008
    cfg = load(tmp_path, "model: {activation: swiglu, ffn_hidden_size: 100}\n")
    assert cfg.model.ffn_hidden_size == 100


def test_padded_vocab_depends_on_tensor_parallel_size(tmp_path):
    cfg = load(tmp_path, "parallel: {tensor: 2}\n", world_size=2)
    assert cfg.model.padded_vocab_size == 512
    cfg = load(tmp_path, "model: {vocab_size: 50277}\nparallel: {tensor: 4}\n", world_size=4)
    assert cfg.model.padded_vocab_size == 50688  # multiple of 128 x 4


def test_data_parallel_size_from_world_size(tmp_path):
    cfg = load(tmp_path, "parallel: {tensor: 2}\n", world_size=8)
    assert cfg.parallel.data == 4
    assert cfg.training.global_batch_size == 4  # micro 1 x accumulation 1 x dp 4


def test_data_parallel_size_from_launcher(tmp_path):
    cfg = load(tmp_path, "launcher: {nproc_per_node: 4, num_nodes: 2}\n")
    assert cfg.parallel.data == 8
    with pytest.raises(ConfigError, match=r"world size \(4\) must equal parallel\.tensor \(8\)"):
        load(
            tmp_path,
            "launcher: {nproc_per_node: 4}\nparallel: {tensor: 8}\nmodel: {num_attention_heads: 8}\n",
        )


def test_derived_key_in_yaml_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"extra0\.yml: parallel\.data: derived, do not set"):
        load(tmp_path, "parallel: {data: 2}\n")
    with pytest.raises(ConfigError, match=r"model\.padded_vocab_size: derived, do not set"):
        load(tmp_path, "model: {padded_vocab_size: 512}\n")
    with pytest.raises(ConfigError, match=r"<override>: model\.kv_channels: derived, do not set"):
        load(tmp_path, overrides=("model.kv_channels=16",))


def test_gradient_accumulation_derived_from_global_batch(tmp_path):
    cfg = load(tmp_path, "training: {micro_batch_size: 2, global_batch_size: 32}\n", world_size=4)
    assert cfg.training.gradient_accumulation_steps == 4
    cfg = load(
        tmp_path, "training: {micro_batch_size: 2, gradient_accumulation_steps: 3}\n", world_size=2
    )
    assert cfg.training.global_batch_size == 12


def test_global_batch_must_divide_exactly(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"training\.global_batch_size: \(30\) must be divisible by training\.micro_batch_size \(2\) x data parallel size \(4\) = 8",
    ):
        load(tmp_path, "training: {micro_batch_size: 2, global_batch_size: 30}\n", world_size=4)


def test_world_size_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match=r"world size \(0\) must be >= 1"):
        load(tmp_path, world_size=0)


def test_direct_construction_fills_section_local_derivations():
    model = ModelConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=2,
        vocab_size=100,
        max_position_embeddings=16,
    )
    assert (model.kv_channels, model.num_kv_heads, model.ffn_hidden_size) == (16, 2, 128)
    assert model.padded_vocab_size == 128


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    cfg = load(
        tmp_path,
        "parallel: {tensor: 2}\ntraining: {global_batch_size: 8}\nobjective: {z_loss: 0.01}\n"
        "model: {rope_scaling: {type: llama3, factor: 8, original_max_position_embeddings: 64}}\n",
        world_size=4,
    )
    out = tmp_path / "saved" / "config.yml"
    save_config(cfg, out)
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind
    saved = yaml.safe_load(out.read_text())
    assert saved["parallel"]["data"] == 2 and saved["model"]["kv_channels"] == 16
    assert load_config([out], world_size=4, resolved=True) == cfg
    assert load_config([out], resolved=True) == cfg  # world size recovered from parallel.data


def test_resolved_load_rejects_inconsistent_derived_values(tmp_path):
    out = tmp_path / "config.yml"
    save_config(load(tmp_path), out)
    with pytest.raises(
        ConfigError, match=r"parallel\.data: is 1 in the resolved config but derives to 2"
    ):
        load_config([out], world_size=2, resolved=True)
    with pytest.raises(
        ConfigError, match=r"model\.kv_channels: is 16 in the resolved config but derives to 8"
    ):
        load_config([out], ["model.hidden_size=32"], resolved=True)


def test_saved_config_needs_resolved_flag(tmp_path):
    out = tmp_path / "config.yml"
    save_config(load(tmp_path), out)
    with pytest.raises(ConfigError, match=r"derived, do not set"):
        load_config([out])


def test_config_to_dict_is_plain_data(tmp_path):
    data = config_to_dict(load(tmp_path))
    assert data["model"]["padded_vocab_size"] == 512
    assert data["data"]["train"] == [{"path": "corpus", "weight": 1.0}]
    assert yaml.safe_load(yaml.safe_dump(data)) == data


# ----------------------------------------------------------------------------- deepspeed
def test_deepspeed_config(tmp_path):
    cfg = load(
        tmp_path,
        "training: {micro_batch_size: 2, global_batch_size: 16, precision: bf16, gradient_clipping: 0.5}\n"
        "parallel: {zero_stage: 1}\n",
        world_size=2,
    )
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["steps_per_print"] >= 10**9 and ds["wall_clock_breakdown"] is False


def test_deepspeed_fp16_uses_dynamic_loss_scale(tmp_path):
    ds = deepspeed_config(load(tmp_path, "training: {precision: fp16}\n"))
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0
    assert ds["bf16"]["enabled"] is False


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_accepts_the_derived_config(tmp_path, stage):
    runtime_config = pytest.importorskip("deepspeed.runtime.config", reason="needs deepspeed")
    cfg = load(
        tmp_path,
        f"parallel: {{zero_stage: {stage}}}\n"
        f"training: {{global_batch_size: 4, precision: {'bf16' if stage else 'fp32'}}}\n",
    )
    parsed = runtime_config.DeepSpeedConfig(deepspeed_config(cfg))
    assert parsed.train_batch_size == 4
    assert parsed.gradient_accumulation_steps == 4
    assert parsed.zero_optimization_stage == stage


def test_deepspeed_clipping_moves_to_the_trainer_in_plain_fp32(tmp_path):
    """fp32 without ZeRO: DeepSpeed keeps no gradient norm, so the trainer's hook clips instead."""
    cfg = load(tmp_path, "training: {gradient_clipping: 0.7}\nparallel: {zero_stage: 0}\n")
    assert cfg.training.gradient_clipping == 0.7
    assert deepspeed_config(cfg)["gradient_clipping"] == 0.0


def test_split_config_args():
    from megatron.config import split_config_args

    argv = ["a.yml", "--local_rank=1", "training.train_iters=5", "dir=x/run.yaml", "b.yml"]
    assert split_config_args(argv) == (
        ["a.yml", "dir=x/run.yaml", "b.yml"],
        ["training.train_iters=5"],
    )
