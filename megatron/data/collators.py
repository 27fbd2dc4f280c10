"""Collators: lists of samples -> model-ready batches.

Shapes: b micro-batch size, s sequence length.

A *sequence* batch (objective ``batch_kind == "sequence"``) is built from samples holding
``tokens`` of length ``s + 1``: the model reads ``tokens[:-1]`` and predicts ``tokens[1:]``.
The padded/packed post-training collators arrive with the post-training data formats.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def collate_sequences(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack fixed-length windows.

    Args:
        samples: dicts with ``tokens`` ``[s + 1]`` integer arrays and an optional ``loss_mask``
            ``[s + 1]`` (mask of the *target* tokens; position 0 is never a target).

    Returns:
        ``tokens [b, s]``, ``targets [b, s]`` int64 and ``loss_mask [b, s]`` float32.
    """
    tokens = torch.from_numpy(np.stack([np.asarray(x["tokens"], dtype=np.int64) for x in samples]))
    if "loss_mask" in samples[0]:
        mask = torch.from_numpy(np.stack([np.asarray(x["loss_mask"]) for x in samples]))[:, 1:]
    else:
        mask = torch.ones(tokens.shape[0], tokens.shape[1] - 1)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask.float()}
