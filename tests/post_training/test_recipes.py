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
