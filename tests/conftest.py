"""Shared fixtures: a fixed English corpus and a tiny byte-level BPE tokenizer built from it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

_SUBJECTS = [
    "the model", "a small cat", "our team", "the river", "every student", "the old engine",
    "a quiet village", "the new optimizer", "my neighbour", "the data loader",
]  # fmt: skip
_VERBS = [
    "reads", "watches", "builds", "follows", "explains", "measures", "carries", "remembers",
    "improves", "tests",
]  # fmt: skip
_OBJECTS = [
    "the long report", "a red bicycle", "several gradients", "the morning news", "a blue sky",
    "the evening train", "three careful notes", "the shared memory", "a quick answer",
    "the final checkpoint",
]  # fmt: skip
_TAILS = [
    "before lunch", "with great care", "in the garden", "after the storm", "without a word",
    "near the station", "every single day", "during the night", "for the first time", "again",
]  # fmt: skip


def make_english_corpus(num_docs: int = 400, seed: int = 1234) -> list[str]:
    """Deterministic English-like documents of 1-4 sentences (same output on every machine)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sentences = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
            if rng.random() < 0.6:
                words.append(rng.choice(_TAILS))
            sentence = " ".join(words)
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "!", "?"]))
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def english_corpus() -> list[str]:
    """400 fixed English documents."""
    return make_english_corpus()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE (vocab <= 512, specials <|endoftext|> <|pad|> <|im_start|> <|im_end|>)."""
    from megatron.tokenizer.build import build_byte_level_bpe

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    return build_byte_level_bpe(make_english_corpus(2000, seed=7), vocab_size=512, out_dir=out)
