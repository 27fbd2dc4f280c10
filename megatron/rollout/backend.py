"""Generation backends of online RL: who turns prompts into sampled completions.

A backend implements :class:`GenerationBackend`: ``generate(prompts, sampling, row_seeds,
eos_id, repeat)`` for one rank's prompts (``repeat`` completions of each), and ``sync_weights()`` called after each optimizer step that
changes the policy (a server backend pushes the new weights there; vLLM/SGLang would plug in
here). The built-in one, :class:`BuiltinBackend`, runs the policy's own decoder
(:func:`megatron.model.generate.generate`) on the DeepSpeed engine itself: the same layers and TP
shards as training, no copy of the weights and nothing to synchronise, and its reported
log-probs are the training forward's (``sampling/logp_difference`` ~1e-6 in fp32). It runs each
prompt through the model once for all of its completions (``generate(..., repeat=G)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megatron.model.generate import GenerationOutput, SamplingConfig, generate


class GenerationBackend(Protocol):
    """Samples completions of one rank's prompts (see the module docstring)."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        row_seeds: Sequence[int] | None,
        eos_id: int | None,
        repeat: int = 1,
    ) -> list[tuple[list[int], list[float]]]:
        """Per completion (``repeat`` per prompt, prompt-major), the sampled token ids (an
        emitted EOS included) and each one's log-prob under ``softmax(logits / temperature)``
        (before top-k/top-p); ``row_seeds`` has one seed per completion."""
        ...

    def sync_weights(self) -> None:
        """Make the next ``generate`` use the policy's current weights."""
        ...


class BuiltinBackend:
    """The policy's own batched decoder (KV cache) on the training engine.

    Args:
        engine: the DeepSpeed engine (or a :class:`~megatron.model.gpt.GPTModel`).
        group: ranks whose decoding steps stay in lockstep (the data-parallel group: ZeRO-3
            gathers parameters inside every forward).
        batch_size: completions per decoder call (bounds the key/value cache; whole prompts'
            completions per call); ``None``: all at once.
    """

    def __init__(
        self, engine: Any, group: dist.ProcessGroup | None, batch_size: int | None = None
    ) -> None:
        self.engine, self.group, self.batch_size = engine, group, batch_size

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        row_seeds: Sequence[int] | None,
        eos_id: int | None,
        repeat: int = 1,
    ) -> list[tuple[list[int], list[float]]]:
        size = max(self.batch_size // repeat, 1) if self.batch_size else max(len(prompts), 1)
        # why: every rank of the group runs the same number of calls (ZeRO-3 gathers inside them)
        calls = -(-len(prompts) // size)
        if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            n = torch.tensor([calls], dtype=torch.long, device=_device(self.engine))
            dist.all_reduce(n, op=dist.ReduceOp.MAX, group=self.group)
            calls = int(n)
        out: list[tuple[list[int], list[float]]] = []
        for k in range(calls):
            rows = list(prompts[k * size : (k + 1) * size])
            first, last = k * size * repeat, (k + 1) * size * repeat
            seeds = None if row_seeds is None else list(row_seeds[first:last])
            if not rows:  # this rank is done; keep the others company with one dummy row
                dummy = [list(prompts[0]) if prompts else [0]]
                generate(
                    self.engine, dummy, sampling, eos_id=eos_id, row_seeds=[0], group=self.group
                )
                continue
            gen = generate(
                self.engine, rows, sampling, eos_id=eos_id, row_seeds=seeds, repeat=repeat,
                group=self.group,
            )  # fmt: skip
            out += _rows(gen)
        return out

    def sync_weights(self) -> None:
        """Nothing to do: the decoder reads the engine's live parameters."""


def _device(engine: Any) -> torch.device:
    inner = getattr(engine, "module", engine)
    return inner.embedding.weight.device


def _rows(gen: GenerationOutput) -> list[tuple[list[int], list[float]]]:
    ids = gen.to_lists()
    logps = [row[: len(t)].tolist() for row, t in zip(gen.logprobs.float().cpu(), ids, strict=True)]
    return list(zip(ids, logps, strict=True))
