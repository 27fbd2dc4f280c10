"""Shared fixtures (a fixed English corpus, a tiny byte-level BPE tokenizer built from it) and the
``gpu`` marker's skip."""

from __future__ import annotations

import importlib
import random
from pathlib import Path

import pytest


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu(needs=[...])`` tests without CUDA or one of the named packages.

    The reason names what the test needs and what is missing, e.g. "needs CUDA and flash-attn
    (missing: CUDA, flash-attn)"; a package ``a-b`` is imported as ``a_b``.
    """
    marked = [(item, item.get_closest_marker("gpu")) for item in items]
    marked = [(item, mark) for item, mark in marked if mark is not None]
    if not marked:
        return
    import torch

    cuda = torch.cuda.is_available()
    for item, mark in marked:
        packages = list(mark.kwargs.get("needs", ()))
        missing = ([] if cuda else ["CUDA"]) + [
            p for p in packages if not _importable(p.replace("-", "_"))
        ]
        if missing:
            needs = " and ".join(["CUDA", *packages])
            reason = f"needs {needs} (missing: {', '.join(missing)})"
            item.add_marker(pytest.mark.skip(reason=reason))


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
