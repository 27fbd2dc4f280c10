"""Datasets and collators: padded and packed layouts, pair/unpaired sequence order, log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron.data.batch import KL_SEQUENCES, Batch
from megatron.data.collators import Collator, place_packed
from megatron.data.datasets import PairwiseDataset, SFTDataset, UnpairedDataset
from megatron.data.preprocess import PreprocessOptions, preprocess
from megatron.objectives.logprobs import sequence_log_probs
from tests.data.conftest import write_jsonl


def _check_layout(batch: Batch, seqs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Every sequence appears contiguously with restarting positions, its targets and mask."""
    assert batch.num_sequences == len(seqs)
    for t in (batch.tokens, batch.targets, batch.layout.position_ids, batch.sequence_ids):
        assert t.dtype == torch.int64
    assert batch.loss_mask.dtype == torch.float32
    pos = batch.layout.position_ids
    seg = batch.layout.segment_ids
    if seg is None:  # padded: one sequence per row from offset 0, no segment tensor
        lengths = pos.max(dim=1).values + 1
        seg = (torch.arange(pos.shape[1]) < lengths[:, None]).long()
    assert seg.dtype == torch.int64
    found = 0
    for r in range(seg.shape[0]):
        for s in range(1, int(seg[r].max()) + 1):
            idx = torch.nonzero(seg[r] == s).squeeze(-1)
            assert (idx == torch.arange(idx[0], idx[0] + idx.numel())).all()
            assert (pos[r, idx] == torch.arange(idx.numel())).all()
            toks = batch.tokens[r, idx].numpy()
            match = [
                i for i, (t, _) in enumerate(seqs) if t.size == toks.size and (t == toks).all()
            ]
            assert match, "a sequence was altered"
            ids = batch.sequence_ids[r, idx[:-1]]
            owner = int(ids[ids >= 0][0]) if (ids >= 0).any() else None
            if owner is not None:
                tok, trained = seqs[owner]
                assert (tok == toks).all()
                assert (batch.targets[r, idx[:-1]].numpy() == tok[1:]).all()
                assert (batch.loss_mask[r, idx[:-1]].numpy() == trained[1:]).all()
            found += 1
    assert found == len(seqs)
    assert ((batch.sequence_ids >= 0) == (batch.loss_mask > 0)).all()


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, c, r = (rng.integers(4, 60, size=int(rng.integers(1, k))) for k in (12, 9, 9))
        out.append({"prompt": p, "chosen": c, "rejected": r, "margin": float(rng.random())})
    return out


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_pair_batches(layout):
    samples = _pairs(5)
    batch = Collator("pair", layout, seq_length=24, pad_to_multiple_of=8, with_margin=True)(samples)
    seqs = []
    for key in ("chosen", "rejected"):
        for x in samples:
            tok = np.concatenate([x["prompt"], x[key]])
            seqs.append((tok, np.arange(tok.size) >= x["prompt"].size))
    _check_layout(batch, seqs)
    assert batch.margin.tolist() == pytest.approx([x["margin"] for x in samples])
    longest = max(t.size for t, _ in seqs)
    if layout == "padded":
        assert batch.tokens.shape == (10, min(24, -(-longest // 8) * 8))
    else:
        assert batch.tokens.shape[0] < 10 and batch.tokens.shape[1] <= 24
    real = sum(t.size for t, _ in seqs)
    assert batch.stats["packing_efficiency"] == pytest.approx(real / batch.tokens.numel())


def test_packing_is_balanced_first_fit_decreasing_and_deterministic():
    """[5, 9, 3, 7, 2] into rows of 10: FFD needs 3 rows (9 | 7 3 | 5 2, fullest 10); the
    smallest capacity that keeps 3 rows is 9 (9 | 7 2 | 5 3): a 3 x 9 batch instead of 3 x 10.
    One row needs no balancing; balancing never adds a row."""
    assert place_packed([5, 9, 3, 7, 2], 10) == [(2, 0), (0, 0), (2, 5), (1, 0), (1, 7)]
    assert place_packed([3, 4], 10) == [(0, 4), (0, 0)]
    spans = [150] * 7 + [140]  # FFD at 1024: 6 x 150 = 900 | 150 + 140 = 290, a 2 x 900 batch
    where = place_packed(spans, 1024)
    fills = [sum(n for (r, _), n in zip(where, spans, strict=True) if r == row) for row in (0, 1)]
    assert max(r for r, _ in where) == 1 and fills == [600, 590]  # 2 x 600
    lengths = np.random.default_rng(0).integers(1, 100, size=200).tolist()
    where = place_packed(lengths, 128)
    fill = np.zeros(1 + max(r for r, _ in where), int)
    for (r, o), n in zip(where, lengths, strict=True):
        fill[r] = max(fill[r], o + n)
    assert fill.max() <= 128 and sum(lengths) / (len(fill) * 128) > 0.9


def test_sequences_longer_than_seq_length_are_refused():
    with pytest.raises(ValueError, match="more than data.seq_length 8"):
        Collator("sequence", "padded", 8)([{"tokens": np.arange(9), "loss_mask": np.ones(9)}])


def test_packed_equals_padded_log_probs():
    from megatron.config import ModelConfig
    from megatron.model import GPTModel
    from megatron.parallel import ParallelState

    cfg = ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2, vocab_size=64,
        make_vocab_size_divisible_by=32, max_position_embeddings=64, norm="rmsnorm",
        activation="swiglu", ffn_hidden_size=64,
    )  # fmt: skip
    model = GPTModel(cfg, ParallelState.single()).eval()
    samples = _pairs(6, seed=1)
    out = {}
    for layout in ("padded", "packed"):
        batch = Collator("pair", layout, seq_length=32, pad_to_multiple_of=4)(samples)
        with torch.no_grad():
            logps = model(batch.tokens, batch.layout, batch.targets)["token_logps"]
        out[layout] = sequence_log_probs(logps, batch)[0]
    assert out["padded"].shape == (12,)
    torch.testing.assert_close(out["packed"], out["padded"], rtol=1e-5, atol=1e-5)
    assert (out["padded"] < 0).all()


@pytest.fixture(scope="module")
def unpaired_prefix(tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("unpaired")
    rows = [
        {"prompt": f"Question {i}:", "completion": f" the answer {i}", "label": i % 3 != 0}
        for i in range(9)
    ]
    preprocess(
        [write_jsonl(tmp / "u.jsonl", rows)], tmp / "u", tiny_tokenizer_dir,
        PreprocessOptions(data_format="unpaired"),
    )  # fmt: skip
    return tmp / "u"


def test_unpaired_kl_mismatch_rule_and_batches(unpaired_prefix, tokenizer):
    ds = UnpairedDataset(unpaired_prefix, seq_length=64, seed=5)
    assert (ds.partner != np.arange(9)).all() and sorted(ds.partner) == list(range(9))
    again = UnpairedDataset(unpaired_prefix, seq_length=64, seed=5)
    assert (again.partner == ds.partner).all()
    samples = [ds[i] for i in (0, 4, 7)]
    assert samples[0]["label"] is False and samples[1]["label"] is True
    batch = Collator("unpaired", "packed", seq_length=64)(samples)
    assert batch.kl_start == 3 and batch.num_sequences == 6
    assert batch.labels.tolist() == [False, True, True]
    seqs = []
    for key in ("completion", "kl_completion"):
        for x in samples:
            tok = np.concatenate([x["prompt"], x[key]])
            seqs.append((tok, np.arange(tok.size) >= x["prompt"].size))
    _check_layout(batch, seqs)
    kl_text = tokenizer.decode(samples[0]["kl_completion"])
    assert kl_text == tokenizer.decode(ds[int(ds.partner[0])]["completion"]) != " the answer 0"


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_unpaired_kl_as_a_separate_sub_batch(unpaired_prefix, layout):
    """``separate_kl``: the KL sequences become ``batch.sub_batches[KL_SEQUENCES]`` (same layout
    rules), the main batch holds the examples only; the sequences are those of the appended form."""
    ds = UnpairedDataset(unpaired_prefix, seq_length=64, seed=5)
    samples = [ds[i] for i in (0, 4, 7)]
    joint = Collator("unpaired", layout, seq_length=64)(samples)
    split = Collator("unpaired", layout, seq_length=64, separate_kl=True)(samples)
    sub = split.sub_batches[KL_SEQUENCES]
    assert split.num_sequences == 3 and split.kl_start == 3
    assert sub.num_sequences == 3 and sub.labels is None
    examples, kl = [], []
    for key, out in (("completion", examples), ("kl_completion", kl)):
        for x in samples:
            tok = np.concatenate([x["prompt"], x[key]])
            out.append((tok, np.arange(tok.size) >= x["prompt"].size))
    _check_layout(split, examples)
    _check_layout(sub, kl)
    _check_layout(joint, examples + kl)
    assert split.stats["real_tokens"] == joint.stats["real_tokens"]
    assert (layout == "padded") == (sub.layout.segment_ids is None)


def test_sft_dataset_and_seq_length_check(tmp_path, tiny_tokenizer_dir, chatml, pairwise_prefix):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"prompt": "Say:", "completion": " the river"},
    ]
    opts = PreprocessOptions(data_format="sft", chat_template=str(chatml))
    preprocess([write_jsonl(tmp_path / "s.jsonl", rows)], tmp_path / "s", tiny_tokenizer_dir, opts)
    ds = SFTDataset(tmp_path / "s", seq_length=64)
    batch = Collator("sequence", "padded", 64)([ds[0], ds[1]])
    _check_layout(batch, [(ds[i]["tokens"], ds[i]["loss_mask"] > 0) for i in range(2)])
    longest = max(ds[i]["tokens"].size for i in range(2))
    assert batch.tokens.shape == (2, -(-longest // 8) * 8)  # dynamic, not seq_length

    from megatron.data.indexed import DatasetError

    with pytest.raises(
        DatasetError, match=r"longest sequence has \d+ tokens but data.seq_length is 8"
    ):
        PairwiseDataset(pairwise_prefix, seq_length=8)
    with pytest.raises(DatasetError, match="format is 'pairwise', SFTDataset reads 'sft'"):
        SFTDataset(pairwise_prefix, seq_length=4096)


def test_prompt_batches():
    samples = [{"prompt": np.arange(1, 6)}, {"prompt": np.arange(1, 3)}]
    batch = Collator("prompt", "padded", 16)(samples)
    assert batch.prompt_lengths.tolist() == [5, 2] and not batch.loss_mask.any()
    assert (batch.sequence_ids == -1).all() and batch.tokens.shape == (2, 8)


def _unpaired(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, c, k = (rng.integers(4, 60, size=int(rng.integers(1, 8))) for _ in range(3))
        out.append({"prompt": p, "completion": c, "kl_completion": k, "label": i % 2 == 0})
    return out


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_unpaired_without_kl_sequences(layout):
    samples = _unpaired(4)
    batch = Collator("unpaired", layout, seq_length=16, with_kl=False)(samples)
    assert batch.num_sequences == 4 and batch.kl_start == 4
    assert batch.labels.tolist() == [True, False, True, False]
    assert int(batch.sequence_ids.max()) == 3
    seqs = []
    for x in samples:
        tok = np.concatenate([x["prompt"], x["completion"]])
        seqs.append((tok, np.arange(tok.size) >= x["prompt"].size))
    _check_layout(batch, seqs)
    with_kl = Collator("unpaired", layout, seq_length=16)(samples)
    assert with_kl.num_sequences == 8 and with_kl.kl_start == 4


def _eos_pairs(n: int, eos: int, seed: int = 0) -> list[dict]:
    """Pairs whose completions hold an EOS, sometimes followed by more tokens."""
    out = _pairs(n, seed)
    for i, x in enumerate(out):
        for k, key in enumerate(("chosen", "rejected")):
            tail = x[key][: (i + k) % 3]  # 0-2 tokens after the EOS
            x[key] = np.concatenate([x[key], [eos], tail]).astype(np.int64)
    return out


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("score_token", ["last", "eos"])
def test_score_index_points_at_each_sequences_scored_token(layout, score_token):
    eos = 3  # _pairs draws ids from 4 up, so the only 3s are the EOS tokens placed here
    samples = _eos_pairs(5, eos)
    collate = Collator(
        "pair", layout, seq_length=32, pad_to_multiple_of=8, score_token=score_token, eos_id=eos
    )
    batch = collate(samples)
    index = batch.score_index
    assert index.dtype == torch.int64 and index.shape == (10,)
    seqs = [np.concatenate([x["prompt"], x[k]]) for k in ("chosen", "rejected") for x in samples]
    width = batch.tokens.shape[1]
    tokens, positions = batch.tokens.reshape(-1), batch.layout.position_ids.reshape(-1)
    for i, tok in enumerate(seqs):
        k = tok.size - 1 if score_token == "last" else int(np.flatnonzero(tok == eos)[-1])
        assert int(positions[index[i]]) == k and int(tokens[index[i]]) == tok[k]
        row, col = divmod(int(index[i]), width)  # sequence i starts at column col - k of row
        assert (batch.tokens[row, col - k : col - k + tok.size].numpy() == tok).all()
    if score_token == "eos":
        assert (tokens[index] == eos).all()
        assert any(t[-1] != eos for t in seqs)  # some EOS are not the last token
    without = Collator("pair", layout, seq_length=32, pad_to_multiple_of=8)(samples)
    assert without.score_index is None


def test_score_token_errors():
    samples = _pairs(2)
    with pytest.raises(
        ValueError, match=r"sequence 0 of the micro-batch holds no EOS token \(id 3\)"
    ):
        Collator("pair", "packed", 32, score_token="eos", eos_id=3)(samples)
    with pytest.raises(ValueError, match="needs the tokenizer's eos_id"):
        Collator("pair", "padded", 32, score_token="eos")
    with pytest.raises(ValueError, match="score_token must be 'last', 'eos' or None"):
        Collator("pair", "padded", 32, score_token="first")
