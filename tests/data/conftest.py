"""Fixtures of the post-training data tests: a ChatML template and small preference corpora."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from megatron.data.preprocess import PreprocessOptions, preprocess
from megatron.tokenizer import load_tokenizer
from tests.conftest import make_english_corpus

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def conversational_pairs(n: int, seed: int = 0) -> list[dict]:
    """Explicit-prompt conversational pairs; every 4th has a system turn, every 5th is multi-turn."""
    rng = random.Random(seed)
    docs = make_english_corpus(3 * n + 10, seed=seed + 11)
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": docs[3 * i]}]
        if i % 4 == 0:
            prompt.insert(0, {"role": "system", "content": "Answer briefly."})
        if i % 5 == 0:
            prompt += [
                {"role": "assistant", "content": "Which part?"},
                {"role": "user", "content": "All of it."},
            ]
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": docs[3 * i + 1]}],
                "rejected": [{"role": "assistant", "content": docs[3 * i + 2]}],
                "margin": round(rng.uniform(0, 3), 3),
            }
        )
    return rows


@pytest.fixture(scope="session")
def chatml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("templates") / "chatml.jinja"
    path.write_text(CHATML)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def pairwise_prefix(tmp_path_factory, tiny_tokenizer_dir, chatml) -> Path:
    """A 64-pair conversational pairwise dataset with margins."""
    tmp = tmp_path_factory.mktemp("pairwise")
    src = write_jsonl(tmp / "pairs.jsonl", conversational_pairs(64))
    options = PreprocessOptions(data_format="pairwise", chat_template=str(chatml))
    preprocess([src], tmp / "pairs", tiny_tokenizer_dir, options)
    return tmp / "pairs"
