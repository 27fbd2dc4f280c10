"""Reward functions with TRL's signature (megatron/rollout/rewards.py): loading, combining, and one
clear error for each kind of bad function or value."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from megatron.rollout.rewards import RewardError, load_reward_function, score_completions

REWARDS = '''
import re

def exact(prompts, completions, answer, **kwargs):
    """TRL-style: 1 for the reference answer, else 0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def length(prompts, completions, **kwargs):
    return [None if "skip" in p else -len(c) / 10 for p, c in zip(prompts, completions)]

def short(prompts, completions, **kwargs):
    return [1.0]

def text(prompts, completions, **kwargs):
    return ["high" for _ in completions]

def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)

def fails_on_row(prompts, completions, **kwargs):
    return [1 / (len(c) - 3) for c in completions]

def no_kwargs(prompts, completions):
    return [0.0] * len(completions)

exact_answer = 3
'''


@pytest.fixture
def module(tmp_path):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(REWARDS))
    return tmp_path


def test_trl_style_functions_combine_with_weights(module):
    """exact (weight 2) and length (weight 1): the total is the weighted sum over the functions
    that apply; a completion none applies to is NaN (no advantage); metrics per function."""
    fns = [
        load_reward_function("my_rewards.py:exact", 2.0, base_dir=module),
        load_reward_function(f"{module / 'my_rewards.py'}:length"),  # absolute path
    ]
    scores = score_completions(
        fns,
        prompts=["q1", "q1", "skip q2"],
        completions=[" 42", "41", "7"],
        columns={"answer": ["42", "42", "8"]},
        completion_ids=[[1, 2], [3], [4]],
    )
    torch.testing.assert_close(scores.total, torch.tensor([2.0 - 0.3, -0.2, 0.0]))
    assert scores.metrics["rewards/exact/mean"] == pytest.approx(1 / 3)
    assert scores.metrics["rewards/length/mean"] == pytest.approx(-0.25)  # None left out
    assert math.isnan(float(scores.per_function[2, 1]))
    only_none = score_completions(fns[1:], ["skip"], ["x"])
    assert math.isnan(float(only_none.total[0]))


def test_a_module_function_loads(module, monkeypatch):
    monkeypatch.syspath_prepend(str(module))
    fn = load_reward_function("my_rewards:exact")
    assert fn.name == "exact" and fn.weight == 1.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.py:exact", r"file .*missing\.py does not exist"),
        ("my_rewards.py:exakt", r"has no 'exakt' \(did you mean 'exact'\?\)"),
        ("my_rewards.py:exact_answer", "'exact_answer' is not callable"),
        ("my_rewards.py:no_kwargs", r"must accept \(prompts, completions, \*\*kwargs\)"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("exact", "expected 'path/to/file.py:name' or 'package.module:name'"),
    ],
)
def test_bad_specs_are_one_clear_error(module, spec, message):
    with pytest.raises(RewardError, match=message):
        load_reward_function(spec, base_dir=module)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("short", r"'my_rewards.py:short' returned 1 values for 3 completions"),
        ("text", r"returned 'high' for completion 0 \(prompt row 10\); values must be numbers"),
        ("nan", r"returned NaN for completion 0 \(prompt row 10\); return None"),
        ("fails_on_row", r"failed on prompt row 11 \(completion 1\): ZeroDivisionError"),
    ],
)
def test_bad_values_name_the_function_and_the_prompt_row(module, name, message):
    fn = load_reward_function(f"my_rewards.py:{name}", base_dir=module)
    with pytest.raises(RewardError, match=message):
        score_completions([fn], ["a", "b", "c"], ["ab", "abc", "abcd"], prompt_rows=[10, 11, 11])


def test_no_completions_calls_no_function():
    """A rank with nothing to score (fewer held-out prompts than ranks) asks no function."""
    from megatron.rollout.rewards import RewardFunction, function_values

    def boom(prompts, completions, **kwargs):
        raise AssertionError("called")

    values = function_values([RewardFunction("boom", "x:boom", boom)], [], [], {}, [], [])
    assert values.shape == (0, 1)
