"""The typed Batch: device moves, copies, and the pipeline's inputs/labels round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron.data.batch import KL_SEQUENCES, Batch, ExtraTargets
from megatron.data.collators import Collator
from megatron.model.layout import SequenceLayout


def _unpaired(layout: str, separate_kl: bool) -> Batch:
    rng = np.random.default_rng(0)
    samples = [
        {
            "prompt": rng.integers(1, 50, 3),
            "completion": rng.integers(1, 50, 2 + i),
            "kl_completion": rng.integers(1, 50, 4 - i),
            "label": i % 2 == 0,
        }
        for i in range(3)
    ]
    return Collator("unpaired", layout, seq_length=16, separate_kl=separate_kl)(samples)


def test_to_moves_every_tensor_and_sub_batch():
    batch = _unpaired("packed", separate_kl=True).replace(example_ids=torch.tensor([4, 1, 2]))
    moved = batch.to(torch.device("meta"))
    assert moved.tokens.is_meta and moved.layout.segment_ids.is_meta and moved.labels.is_meta
    sub = moved.sub_batches[KL_SEQUENCES]
    assert sub.tokens.is_meta and sub.layout.position_ids.is_meta
    assert not batch.tokens.is_meta  # the original is untouched
    assert moved.num_sequences == batch.num_sequences and moved.stats == batch.stats


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_pipeline_labels_round_trip(layout):
    """The last stage rebuilds every per-example field; inputs carry tokens, layout, targets."""
    batch = _unpaired(layout, separate_kl=False).replace(example_ids=torch.tensor([7, 8, 9]))
    fields = batch.label_fields()
    assert fields == (
        "loss_mask",
        "sequence_ids",
        "example_ids",
        "labels",
        "num_sequences",
        "kl_start",
    )
    back = Batch.from_pipeline_labels(batch.pipeline_labels(fields), fields)
    for name in ("loss_mask", "sequence_ids", "example_ids", "labels"):
        assert torch.equal(getattr(back, name), getattr(batch, name))
    assert back.num_sequences == 6 and back.kl_start == 3 and back.margin is None
    tokens, pos, seg, pre, targets = batch.pipeline_inputs()
    again = SequenceLayout.from_tensors(pos, seg, pre)
    assert torch.equal(tokens, batch.tokens) and torch.equal(targets, batch.targets)
    assert again.kind == ("causal" if layout == "padded" else "segments")


def test_what_a_pipeline_cannot_carry_is_refused():
    batch = _unpaired("padded", separate_kl=True)
    with pytest.raises(ValueError, match=r"sub-batches \(\['kl'\]\) cannot travel"):
        batch.pipeline_labels(batch.label_fields())
    extra = ExtraTargets(torch.tensor([0]), torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="not supported with parallel.pipeline > 1"):
        batch.replace(extra_targets=extra).pipeline_inputs()
