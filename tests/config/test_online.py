"""Online RL's config: the ``rollout:`` and ``rewards:`` sections and their rules, each refused at
load with a message naming the key (pytest.raises(ConfigError, match=...) per rule)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron.config import ConfigError, load_config, save_config

BASE = """\
model:
  num_layers: 2
  hidden_size: 32
  num_attention_heads: 4
  vocab_size: 300
  max_position_embeddings: 128
data:
  train: [{path: prompts}]
  tokenizer: tok
  seq_length: 64
objective: {name: grpo, num_generations: 4}
rollout: {prompts_per_step: 4, max_new_tokens: 16}
rewards:
  - {function: rewards/acc.py:accuracy}
optimizer: {lr: 1e-5}
training: {train_iters: 10, micro_batch_size: 4, global_batch_size: 8}
"""

REWARDS = """\
def accuracy(prompts, completions, answer=None, **kwargs):
    return [1.0 for _ in completions]

def no_kwargs(prompts, completions):
    return [0.0 for _ in completions]
"""


def load(tmp_path: Path, extra: str = "", overrides=(), world_size: int | None = None):
    (tmp_path / "rewards").mkdir(exist_ok=True)
    (tmp_path / "rewards" / "acc.py").write_text(REWARDS)
    base = tmp_path / "base.yml"
    base.write_text(BASE)
    run = tmp_path / "run.yml"
    run.write_text(extra)
    return load_config([base, run], list(overrides), world_size)


def test_valid_online_config_resolves_reward_paths(tmp_path, monkeypatch):
    cfg = load(tmp_path)
    (spec,) = cfg.rewards
    # relative to the file that names it, whatever the working directory
    assert spec.function == f"{(tmp_path / 'rewards' / 'acc.py').resolve()}:accuracy"
    assert spec.label == "accuracy" and spec.weight == 1.0
    assert cfg.rollout.prompts_per_step == 4 and cfg.data.layout == "prefix_shared_packed"
    save_config(cfg, tmp_path / "saved.yml")  # the resolved config loads back from anywhere
    monkeypatch.chdir(tmp_path / "rewards")
    again = load_config([tmp_path / "saved.yml"], resolved=True)
    assert again.rewards == cfg.rewards


def test_rewards_override_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load(tmp_path, overrides=["rewards=[{function: rewards/acc.py:accuracy, weight: 2}]"])
    assert cfg.rewards[0].weight == 2.0
    with pytest.raises(ConfigError, match=r"<override>: rewards\[0\]\.function: reward function"):
        load(tmp_path, overrides=["rewards=[{function: missing.py:f}]"])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            "rewards: [{function: rewards/acc.py:acuracy}]",
            r"run\.yml: rewards\[0\]\.function: .*has no 'acuracy' \(did you mean 'accuracy'\?\)",
        ),
        ("rewards: [{function: rewards/nope.py:f}]", r"rewards\[0\]\.function: .*does not exist"),
        (
            "rewards: [{function: rewards/acc.py:no_kwargs}]",
            r"rewards\[0\]\.function: .*must accept \(prompts, completions, \*\*kwargs\)",
        ),
        ("rewards: [{function: no.such.module:f}]", r"cannot import 'no\.such\.module'"),
        ("rewards: [{model: runs/nowhere}]", r"rewards\[0\]\.model: runs/nowhere does not exist"),
        (
            "rewards: [{function: rewards/acc.py:accuracy, model: x}]",
            r"rewards\[0\]\.function: give exactly one of function or model",
        ),
        (
            "rewards:\n  - {function: rewards/acc.py:accuracy}\n  - {function: rewards/acc.py:accuracy}",
            r"rewards: two rewards are named 'accuracy'",
        ),
        ("rewards: []", r"rewards: objective 'grpo' needs at least one reward"),
        ("rewards: {function: f}", r"run\.yml: rewards: expected a list of mappings, got mapping"),
    ],
)
def test_bad_rewards(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        load(tmp_path, extra)


@pytest.mark.parametrize(
    ("extra", "overrides", "world", "match"),
    [
        (
            "",
            ["objective.num_generations=1"],
            None,
            r"objective\.num_generations \(1\) must be >= 2: grpo's baseline compares",
        ),
        (
            "rollout: {prompts_per_step: 3}",
            ["training.global_batch_size=12"],
            2,
            r"rollout\.prompts_per_step \(3\) must be divisible by the data parallel size \(2\)",
        ),
        (
            "rollout: {prompts_per_step: 3}",
            [],
            None,
            r"= 12 completions per rollout must be a multiple of training\.global_batch_size \(8\)",
        ),
        (
            "rollout: {max_new_tokens: 64}",
            [],
            None,
            r"rollout\.max_new_tokens \(64\) must be < data\.seq_length \(64\)",
        ),
        (
            "parallel: {pipeline: 2}",
            [],
            2,
            r"parallel\.pipeline \(2\): objective 'grpo' samples completions with the policy's "
            r"own decoder, which does not run across pipeline stages",
        ),
        ("", ["data.tokenizer=null"], None, r"data\.tokenizer: objective 'grpo' decodes"),
        (
            "",
            ["objective.beta=0.04", "reference.source=cache", "reference.cache=c"],
            None,
            r"reference\.source \(cache\): objective 'grpo' scores freshly sampled completions",
        ),
        (
            "rollout: {temperature: 0}",
            [],
            None,
            r"rollout\.temperature: must be a finite number > 0",
        ),
        ("rollout: {top_p: 0}", [], None, r"rollout\.top_p: must be in \(0, 1\]"),
        (
            "",
            [
                "objective={name: reinforce, baseline: loo, num_generations: 1}",
                "training.global_batch_size=4",
            ],
            None,
            r"objective\.num_generations \(1\) must be >= 2 with objective\.baseline: loo",
        ),
    ],
)
def test_online_rules(tmp_path, extra, overrides, world, match):
    with pytest.raises(ConfigError, match=match):
        load(tmp_path, extra, overrides, world)


def test_rewards_of_an_offline_objective_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "tests.config.test_online.BASE",
        BASE.replace("{name: grpo, num_generations: 4}", "{name: sft}"),
    )
    with pytest.raises(
        ConfigError, match=r"rewards: only online objectives \(grpo, rloo, reinforce\) read rewards"
    ):
        load(tmp_path)


def test_reinforce_moving_average_takes_one_generation(tmp_path):
    cfg = load(
        tmp_path,
        "",
        ["objective={name: reinforce, num_generations: 1}", "training.global_batch_size=4"],
    )
    assert cfg.objective.params.baseline == "moving_average"
