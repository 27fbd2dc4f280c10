"""The typed Batch: device moves, copies, and the pipeline's inputs/labels round trip."""

from __future__ import annotations

import dataclasses

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
    tokens, pos, seg, pre, targets, extra = batch.pipeline_inputs()
    again = SequenceLayout.from_tensors(pos, seg, pre)
    assert torch.equal(tokens, batch.tokens) and torch.equal(targets, batch.targets)
    assert again.kind == ("causal" if layout == "padded" else "segments")
    assert extra.shape == (2, 1)  # the placeholder column only: no extra targets


def test_extra_targets_travel_to_the_last_stage():
    """Prefix-shared rows: the first stage's message carries (index, target) after a placeholder
    column; the last stage's labels rebuild the ExtraTargets with their sequence ids."""
    batch = _unpaired("padded", separate_kl=False)
    extra = ExtraTargets(torch.tensor([3, 9]), torch.tensor([11, 12]), torch.tensor([0, 4]))
    batch = batch.replace(extra_targets=extra)
    message = batch.pipeline_inputs()[-1]
    assert message.tolist() == [[0, 3, 9], [0, 11, 12]]
    fields = batch.label_fields()
    assert "extra_targets" in fields
    back = Batch.from_pipeline_labels(batch.pipeline_labels(fields), fields).extra_targets
    for a, b in zip(dataclasses.astuple(back), dataclasses.astuple(extra), strict=True):
        assert torch.equal(a, b)


def test_sub_batches_cannot_travel_through_a_pipeline():
    batch = _unpaired("padded", separate_kl=True)
    with pytest.raises(ValueError, match=r"sub-batches \(\['kl'\]\) cannot travel"):
        batch.pipeline_labels(batch.label_fields())
