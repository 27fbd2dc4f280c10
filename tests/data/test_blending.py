"""Blending, splits, resumable sampling over blends, and build_data's start-up checks."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.config import DataConfig, DataSource
from megatron.data.blending import BlendedDataset, split_indices
from megatron.data.builders import build_data
from megatron.data.indexed import DatasetError
from megatron.data.meta import check_dataset_compat
from megatron.data.preprocess import PreprocessOptions, preprocess
from megatron.data.sampler import GlobalBatchSampler
from tests.data.conftest import write_jsonl


class Rows:
    """A toy dataset whose items name their origin."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[str, int]:
        assert 0 <= i < self.n
        return self.name, int(i)


def test_blend_weights_are_respected_in_every_prefix():
    parts = [Rows("a", 10), Rows("b", 50), Rows("c", 200)]
    blend = BlendedDataset(parts, [2, 3, 5], seed=1)
    n = len(blend)
    assert n == 260
    counts = np.bincount(blend.dataset_index, minlength=3)
    assert counts.tolist() == [52, 78, 130]
    running = np.cumsum(np.eye(3)[blend.dataset_index], axis=0)
    share = np.outer(np.arange(1, n + 1), [0.2, 0.3, 0.5])
    assert np.abs(running - share).max() < 1.5
    a_rows = [blend[i][1] for i in range(n) if blend[i][0] == "a"]
    assert sorted(a_rows[:10]) == list(range(10))  # read in full before any row repeats
    again = BlendedDataset(parts, [2, 3, 5], seed=1)
    assert [again[i] for i in range(n)] == [blend[i] for i in range(n)]


def test_blend_weights_hold_over_sampled_batches():
    blend = BlendedDataset([Rows("a", 300), Rows("b", 300)], [0.25, 0.75], seed=0)
    sampler = GlobalBatchSampler(len(blend), 8, 1, 0, 4, seed=3)
    seen = [
        blend[i][0] for _, step in zip(range(60), sampler, strict=False) for mb in step for i in mb
    ]
    frac = seen.count("a") / len(seen)
    assert abs(frac - 0.25) < 0.03, frac


def test_sampler_resume_mid_epoch_over_a_blend():
    blend = BlendedDataset([Rows("a", 37), Rows("b", 71)], [1, 2], seed=4)

    def sampler() -> GlobalBatchSampler:
        return GlobalBatchSampler(len(blend), 3, 2, 1, 2, seed=9)

    straight = sampler()
    it = iter(straight)
    for _ in range(7):
        next(it)
    state = straight.state_dict()
    expected = [[blend[i] for mb in next(it) for i in mb] for _ in range(30)]
    resumed = sampler()
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert [[blend[i] for mb in next(it) for i in mb] for _ in range(30)] == expected


def test_split_indices_deterministic_disjoint():
    parts = split_indices(1000, [0.9, 0.07, 0.03], seed=5)
    assert [p.size for p in parts] == [900, 70, 30]
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(1000))
    assert all(np.array_equal(a, b) for a, b in zip(parts, split_indices(1000, [0.9, 0.07, 0.03], 5), strict=True))  # fmt: skip


def _cfg(paths: list[str], **kw) -> DataConfig:
    weights = kw.pop("weights", [1.0] * len(paths))
    train = [DataSource(path=str(p), weight=w) for p, w in zip(paths, weights, strict=True)]
    return DataConfig(train=train, seq_length=kw.pop("seq_length", 512), **kw)


@pytest.fixture(scope="module")
def unpaired_prefix(tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("kto")
    rows = [{"prompt": f"Q{i}", "completion": f" a{i}", "label": bool(i % 2)} for i in range(20)]
    opts = PreprocessOptions(data_format="unpaired")
    preprocess([write_jsonl(tmp / "u.jsonl", rows)], tmp / "u", tiny_tokenizer_dir, opts)
    return tmp / "u"


def test_build_data_blend_split_and_layouts(pairwise_prefix, tmp_path, tiny_tokenizer_dir, chatml):
    from tests.data.conftest import conversational_pairs

    other = tmp_path / "other"
    rows = [{k: v for k, v in r.items() if k != "margin"} for r in conversational_pairs(30, 9)]
    src = write_jsonl(tmp_path / "o.jsonl", rows)
    opts = PreprocessOptions(data_format="pairwise", chat_template=str(chatml))
    preprocess([src], other, tiny_tokenizer_dir, opts)
    cfg = _cfg(
        [pairwise_prefix, other], weights=[1, 3], split=[0.8, 0.2, 0.0], layout="packed",
        tokenizer=str(tiny_tokenizer_dir),
    )  # fmt: skip
    data = build_data("pair", cfg, vocab_size=512)
    train, valid, test = data.train, data.valid, data.test
    assert test is None and len(valid) == 13 + 6 and len(train) == 51 + 24
    batch = data.collate([train[i] for i in range(4)])
    assert batch.num_sequences == 8 and batch.tokens.shape[0] < 8
    assert batch.margin is None  # the second dataset has no margin
    assert 0 < batch.stats["packing_efficiency"] <= 1
    single = build_data("pair", _cfg([pairwise_prefix], layout="padded"), 512)
    assert single.valid is None and single.collate([single.train[0]]).margin.shape == (1,)


def test_build_data_refuses_mismatches(pairwise_prefix, unpaired_prefix, tmp_path):
    with pytest.raises(
        DatasetError,
        match=r"data\.train\[0\]: .*pairs: format 'pairwise' serves the 'pair' batch kind, but "
        r"the objective needs 'unpaired' data; preprocess with --format unpaired \(--from-pairwise",
    ):
        build_data("unpaired", _cfg([pairwise_prefix]), 512)
    with pytest.raises(DatasetError, match=r"data\.train\[1\]: .*'unpaired' serves .*needs 'pair'"):
        build_data("pair", _cfg([pairwise_prefix, unpaired_prefix]), 512)
    with pytest.raises(
        DatasetError, match=r"vocabulary of 512 tokens, but model\.vocab_size is 100"
    ):
        check_dataset_compat(pairwise_prefix, "pair", None, 100)

    from megatron.tokenizer.build import build_byte_level_bpe

    other_tok = build_byte_level_bpe(["another corpus entirely"] * 50, 300, tmp_path / "tok")
    with pytest.raises(DatasetError, match=r"built with tokenizer .* but data\.tokenizer .*hashes"):
        build_data("pair", _cfg([pairwise_prefix], tokenizer=str(other_tok)), 512)
    data = build_data("unpaired", _cfg([unpaired_prefix], seq_length=64), 512)
    batch = data.collate([data.train[i] for i in range(4)])
    assert batch.kl_start == 4 and batch.labels.dtype.is_floating_point is False
