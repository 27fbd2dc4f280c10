"""The tiny runs of the end-to-end tests, written once: ``tiny_run_config(preset, ...)``.

Two presets share one model shape (2 layers, hidden 32, 4 heads / 2 KV heads, RMSNorm, SwiGLU):

* ``"markov"``: the synthetic corpus of ``tests/training/helpers.write_markov_corpus`` (token ids
  below 120, documents of 9-41 tokens): 32-token sequences, lr 1e-2 (cosine, 2 warm-up steps),
  10 steps of 2 micro-batches of 2, seed 7.
* ``"chat"``: ChatML conversations tokenized with the tests' 512-token byte-level BPE
  (``tiny_tokenizer_dir`` in ``tests/conftest.py``): 512-token sequences, lr 2e-3 (constant),
  global batch 4 in micro-batches of 2, seed 3; the objective and length come from the test.

Dotted keyword overrides replace single values (``**{"training.train_iters": 4}``); a plain key
sets a whole section (``objective={"name": "dpo", "beta": 0.1}``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

MARKOV_VOCAB = 120

TINY_MODEL = {
    "num_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_kv_heads": 2,
    "norm": "rmsnorm",
    "activation": "swiglu",
}

PRESETS: dict[str, dict[str, Any]] = {
    "markov": {
        "model": {
            **TINY_MODEL,
            "vocab_size": MARKOV_VOCAB,
            "make_vocab_size_divisible_by": 32,
            "max_position_embeddings": 64,
            "ffn_hidden_size": 64,
        },
        "data": {"seq_length": 32},
        "optimizer": {"lr": 1e-2, "weight_decay": 0.01},
        "schedule": {"style": "cosine", "warmup_iters": 2},
        "training": {"train_iters": 10, "micro_batch_size": 2, "global_batch_size": 4, "seed": 7},
    },
    "chat": {
        "model": {
            **TINY_MODEL,
            "vocab_size": 512,
            "make_vocab_size_divisible_by": 64,
            "max_position_embeddings": 512,
        },
        "data": {"seq_length": 512},
        "optimizer": {"lr": 2e-3},
        "schedule": {"style": "constant"},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "seed": 3},
    },
}


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    """``cfg["a"]["b"] = value`` for ``key="a.b"`` (missing sections are created)."""
    node = cfg
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


def tiny_run_config(
    preset: str,
    *,
    train: str | Path,
    valid: str | Path | None = None,
    tokenizer: str | Path | None = None,
    logs: str | Path | None = None,
    with_model: bool = True,
    **overrides: Any,
) -> dict:
    """A complete tiny run as a nested dict (write it with ``tests.training.helpers.write_config``).

    Args:
        preset: ``"markov"`` or ``"chat"`` (see the module docstring).
        train: prefix of the training data.
        valid: prefix of held-out data, if any.
        tokenizer: the tokenizer directory the data was made with, if any.
        logs: ``logging.dir`` (with ``log_interval`` 1); None leaves the logging section out.
        with_model: False leaves the model section out, for runs whose model comes from a
            checkpoint's ``model.yml`` listed before this file.
        **overrides: dotted keys (or whole sections) applied last.

    Returns:
        The run config.
    """
    cfg = copy.deepcopy(PRESETS[preset])
    if not with_model:
        del cfg["model"]
    cfg["data"]["train"] = [{"path": str(train)}]
    if valid is not None:
        cfg["data"]["valid"] = [{"path": str(valid)}]
    if tokenizer is not None:
        cfg["data"]["tokenizer"] = str(tokenizer)
    if logs is not None:
        cfg["logging"] = {"log_interval": 1, "dir": str(logs)}
    for key, value in overrides.items():
        set_dotted(cfg, key, value)
    return cfg


def tiny_model_config(head: str = "lm") -> Any:
    """The 2-layer GQA/SwiGLU/partial-rotary ``ModelConfig`` (vocab 64) of the layout tests."""
    from megatron.config import ModelConfig

    return ModelConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2, vocab_size=64,
        make_vocab_size_divisible_by=32, max_position_embeddings=64, norm="rmsnorm",
        activation="swiglu", ffn_hidden_size=64, rotary_pct=0.5, head=head,
    )  # fmt: skip


def tiny_fp64_model() -> Any:
    """:func:`tiny_model_config` as an fp64 ``GPTModel`` in eval mode (seed 3): exact-layout tests
    compare in fp64 where the transformer is concerned."""
    from megatron.model import GPTModel
    from megatron.parallel import ParallelState

    return GPTModel(tiny_model_config(), ParallelState.single(), seed=3).double().eval()


def padded_batch(pairs: list[tuple[list[int], list[int], list[int]]]) -> Any:
    """One right-padded causal row per sequence: chosen 0..P-1, then rejected P..2P-1 (the
    padded twin of the prefix-shared rows the exact-layout tests build)."""
    import torch

    from megatron.data.batch import Batch
    from megatron.model.layout import SequenceLayout

    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = max(len(p) + len(c) for p, c in seqs)
    n = len(seqs)
    tokens = torch.zeros(n, width, dtype=torch.long)
    targets = torch.zeros_like(tokens)
    ids = torch.full_like(tokens, -1)
    score = []
    for i, (prompt, comp) in enumerate(seqs):
        seq = torch.tensor(prompt + comp)
        tokens[i, : seq.numel()] = seq
        targets[i, : seq.numel() - 1] = seq[1:]
        ids[i, len(prompt) - 1 : seq.numel() - 1] = i
        score.append(i * width + seq.numel() - 1)
    return Batch(
        tokens=tokens,
        targets=targets,
        loss_mask=(ids >= 0).float(),
        layout=SequenceLayout.causal(n, width),
        sequence_ids=ids,
        num_sequences=n,
        score_index=torch.tensor(score),
    )


def prefix_shared_batch(
    pairs: list[tuple[list[int], list[int], list[int]]], rows: list[list[int]]
) -> Any:
    """``[prompt | chosen | rejected]`` per pair, the pairs of ``rows[j]`` packed in row ``j``.

    What a prefix-shared collator must fill: ``segment_ids`` (prompt, chosen, rejected of each
    pair: their own ids; padding 0), ``prefix_ids`` (the prompt's segment id on both
    completions, 0 elsewhere), positions continuing from the prompt in both completions, the
    grid targets (chosen from the prompt's last token, rejected from its own first token) and one
    extra target per pair: the rejected's first token, at the prompt's last hidden state.
    """
    import torch

    from megatron.data.batch import Batch, ExtraTargets
    from megatron.model.layout import SequenceLayout

    n_pairs = len(pairs)
    width = max(sum(len(t) for i in row for t in pairs[i]) for row in rows)
    shape = (len(rows), width)
    tokens = torch.zeros(shape, dtype=torch.long)
    targets = torch.zeros_like(tokens)
    ids = torch.full_like(tokens, -1)
    pos = torch.zeros_like(tokens)
    seg = torch.zeros_like(tokens)
    pre = torch.zeros_like(tokens)
    score = [0] * (2 * n_pairs)
    extra_index, extra_targets, extra_ids = [], [], []
    for j, row in enumerate(rows):
        at = 0
        for i in row:
            prompt, chosen, rejected = pairs[i]
            p, c, r = len(prompt), len(chosen), len(rejected)
            tokens[j, at : at + p + c + r] = torch.tensor(prompt + chosen + rejected)
            s0 = 3 * i + 1  # segment ids of this pair: prompt, chosen, rejected
            seg[j, at : at + p + c + r] = torch.tensor([s0] * p + [s0 + 1] * c + [s0 + 2] * r)
            pre[j, at + p : at + p + c + r] = s0
            pos[j, at : at + p + c + r] = torch.tensor(list(range(p + c)) + list(range(p, p + r)))
            targets[j, at + p - 1 : at + p + c - 1] = torch.tensor(chosen)
            ids[j, at + p - 1 : at + p + c - 1] = i
            targets[j, at + p + c : at + p + c + r - 1] = torch.tensor(rejected[1:])
            ids[j, at + p + c : at + p + c + r - 1] = n_pairs + i
            extra_index.append(j * width + at + p - 1)
            extra_targets.append(rejected[0])
            extra_ids.append(n_pairs + i)
            score[i] = j * width + at + p + c - 1
            score[n_pairs + i] = j * width + at + p + c + r - 1
            at += p + c + r
    return Batch(
        tokens=tokens,
        targets=targets,
        loss_mask=(ids >= 0).float(),
        layout=SequenceLayout(pos, seg, pre),
        sequence_ids=ids,
        num_sequences=2 * n_pairs,
        extra_targets=ExtraTargets(
            torch.tensor(extra_index), torch.tensor(extra_targets), torch.tensor(extra_ids)
        ),
        score_index=torch.tensor(score),
    )
