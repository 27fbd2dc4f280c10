"""TP-aware RNG (Megatron-LM's ``CudaRNGStatesTracker``, device-agnostic).

Dropout on activations that are *replicated* across TP ranks must draw the same mask on every
rank (default generator, same seed on all TP ranks); dropout on *sharded* activations (attention
probabilities of this rank's heads) must draw different masks per rank, from a separate
model-parallel stream seeded with ``seed + 2718 + tp_rank`` (Megatron's offset). The tracker swaps
that stream in and out of the default generator (CPU, and CUDA when present).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
_MP_SEED_OFFSET = 2718


def _get_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGStatesTracker:
    """Named RNG streams that can be forked into temporarily."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed`` (the default stream is left untouched)."""
        saved = _get_state()
        torch.manual_seed(seed)
        self.states[name] = _get_state()
        _set_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block on stream ``name``; its advanced state is kept for the next fork."""
        if name not in self.states:
            raise KeyError(f"RNG stream {name!r} was never added")
        saved = _get_state()
        _set_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state()
            _set_state(saved)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {k: dict(v) for k, v in self.states.items()}

    def load_state_dict(self, sd: dict[str, dict[str, torch.Tensor]]) -> None:
        self.states = {k: dict(v) for k, v in sd.items()}


def add_model_parallel_stream(tracker: RNGStatesTracker, seed: int, tp_rank: int) -> None:
    """Add this TP rank's model-parallel stream (``seed + 2718 + tp_rank``) to ``tracker``."""
    tracker.add(MODEL_PARALLEL_RNG, seed + _MP_SEED_OFFSET + tp_rank)


def model_parallel_seed(tracker: RNGStatesTracker, seed: int, tp_rank: int) -> None:
    """Seed the default stream with ``seed`` and the model-parallel stream per TP rank."""
    torch.manual_seed(seed)
    add_model_parallel_stream(tracker, seed, tp_rank)
