"""The recipes' configs load at their intended grid; the data script converts HF-style rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron.config import load_config

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "hf_to_jsonl", ROOT / "post-training/data/hf_to_jsonl.py"
)
hf_to_jsonl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hf_to_jsonl)


@pytest.mark.parametrize(
    "model, recipe, objective",
    [
        ("mistral-7b", "zephyr/dpo.yml", "dpo"),
        ("llama3-8b", "llama3/sft.yml", "sft"),
        ("llama3-8b", "llama3/dpo.yml", "dpo"),
        ("llama3-8b", "llama3/kto.yml", "kto"),
        ("llama3-8b", "llama3/rm.yml", "reward"),
    ],
)
def test_recipe_configs_load_on_one_node_of_8(model, recipe, objective):
    cfg = load_config(
        [ROOT / f"configs/models/{model}.yml", ROOT / "post-training" / recipe], world_size=8
    )
    assert cfg.objective.name == objective
    assert cfg.training.global_batch_size == 128
    assert cfg.checkpoint.finetune


def test_grpo_recipe_loads_on_one_node_of_8():
    cfg = load_config(
        [ROOT / "configs/models/qwen2.5-1.5b.yml", ROOT / "post-training/qwen2.5/grpo_gsm8k.yml"],
        world_size=8,
    )
    assert cfg.objective.name == "grpo" and cfg.parallel.data == 8
    assert cfg.rollout.prompts_per_step * cfg.objective.params.num_generations == 512
    assert [r.label for r in cfg.rewards] == ["accuracy", "answer_format"]
    assert cfg.rewards[0].function.startswith(str(ROOT / "post-training/qwen2.5/rewards.py"))


def test_gsm8k_rows_and_rewards(tmp_path):
    import datasets

    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
        {"question": "A price of $1,200 doubles.", "answer": "1200*2=2400\n#### 2,400"},
        {"question": "No final answer here.", "answer": "42"},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "gsm8k")
    out = tmp_path / "gsm8k.jsonl"
    args = ["--dataset", str(tmp_path / "gsm8k"), "--split", "train", "--kind", "gsm8k"]
    assert hf_to_jsonl.main([*args, "--out", str(out)]) == 0
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [w["answer"] for w in written] == ["7", "2400"]  # the third row is skipped
    assert (
        written[0]["prompt"][0]["role"] == "user" and "####" in written[0]["prompt"][0]["content"]
    )
    spec = importlib.util.spec_from_file_location(
        "gsm8k_rewards", ROOT / "post-training/qwen2.5/rewards.py"
    )
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)
    completions = [
        [{"role": "assistant", "content": "3 + 4 = 7\n#### 7"}],  # right, formatted
        [{"role": "assistant", "content": "so the answer is \\boxed{2400.0}"}],  # right, boxed
        [{"role": "assistant", "content": "#### 8 ... actually 7"}],  # the #### number counts
        [{"role": "assistant", "content": "no number"}],
    ]
    answers = ["7", "2400", "7", "7"]
    assert rewards.accuracy([], completions, answers) == [1.0, 1.0, 0.0, 0.0]
    assert rewards.answer_format([], completions) == [1.0, 0.0, 0.0, 0.0]


def _uf(chosen_last: str, rejected_last: str, prefix_differs: bool = False) -> dict:
    user = {"role": "user", "content": "What is 2+2?"}
    other = {"role": "user", "content": "What is 3+3?"}
    return {
        "prompt": "What is 2+2?",
        "chosen": [user, {"role": "assistant", "content": chosen_last}],
        "rejected": [
            other if prefix_differs else user,
            {"role": "assistant", "content": rejected_last},
        ],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


def test_pairwise_rows_from_a_saved_dataset(tmp_path):
    import datasets

    rows = [_uf("4", "5"), _uf("4", "4"), _uf("4", "5", prefix_differs=True)]
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows)}).save_to_disk(
        tmp_path / "uf"
    )
    out = tmp_path / "uf.jsonl"
    assert (
        hf_to_jsonl.main(
            [
                "--dataset",
                str(tmp_path / "uf"),
                "--split",
                "train_prefs",
                "--kind",
                "pairwise",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert written == [
        {
            "prompt": [{"role": "user", "content": "What is 2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
            "margin": 4.5,
        }
    ]
    reasons = [r for _, r in hf_to_jsonl.convert(rows, "pairwise")]
    assert reasons == [
        None,
        "chosen == rejected",
        "chosen and rejected differ before the last turn",
    ]


def test_sft_rows():
    good = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    assert [r for r, _ in hf_to_jsonl.convert([good, bad], "sft")] == [good, None]
