"""Batched generation (greedy or sampled) for :class:`~megatron.model.gpt.GPTModel`.

Shapes: b prompts (batch rows), P longest prompt, n generated tokens (longest row), L = P +
max_new_tokens - 1 cache slots per row, v vocabulary (``model.vocab_size``, TP-gathered), nkp kv
heads on this TP rank, hn head dim.

**One decoder path.** Generation calls the model's own ``forward`` with a
:class:`~megatron.model.kv_cache.KVCache`: the layers run the same qkv projection and rotary code
as in training and only the attention step differs (the new keys/values are written into the
cache, the queries attend over its filled slots under a validity/causal/window mask). So a
DeepSpeed engine works too (``engine(tokens, kv_cache=cache)``: ZeRO-3 gathers its parameters in
``forward``), and so does tensor parallelism (the logits are gathered across TP ranks inside the
forward). Pipeline-parallel models are not supported.

**The cache.** Per layer one ``[b, L, nkp, hn]`` key and one value buffer, allocated once before
the prompt is run (no growth). Prompts are left-padded to ``P`` (padding slots are marked invalid,
never attended to), rotary positions start at 0 at each row's first real token, and each later
step writes one slot per row. Sliding-window models keep all slots and mask by position.

**What is exact.** For one row, the logits of a step equal those of the full (uncached) forward
over the row's prompt + generated tokens at its last position, up to float round-off: the mask
is the training mask, but the attention runs over padded key slots with an explicit mask instead
of the causal kernel (measured on the test models: log-probs within 2e-15 in fp64 and 1.5e-6
in fp32; tested). Batched generation equals one prompt at a time, whatever the padding, to the
same round-off; the cached keys of a prompt do not depend on the other rows.

**Decoding.** Temperature 0 is greedy (argmax; the first index on ties). Otherwise the logits are
warped in the order temperature, then top-k, then top-p, which is the order Hugging Face
transformers builds its logits warpers in (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper`` in ``GenerationMixin._get_logits_processor``) and the order vLLM's sampler
applies them in (temperature, then ``apply_top_k_top_p``). Top-k keeps every token whose scaled
logit is at least the k-th largest (ties kept, as HF does); top-p keeps the smallest set of most
probable tokens (after top-k) whose probability reaches ``top_p`` (HF's rule: drop a token when
the mass of the tokens more probable than it already reaches ``top_p``). The token is then drawn
by inverse CDF: one uniform ``u`` per row and step from a ``torch.Generator`` seeded with
``seed``, and the first token in vocabulary order whose cumulative (fp64) probability exceeds
``u``. Because the CDF is taken in vocabulary order, a logit perturbed by round-off (TP = 1 vs 2)
changes the draw only if ``u`` lies within that round-off of a bucket edge.

**Log-probs.** ``GenerationOutput.logprobs`` is, per generated token, ``log_softmax(logits / T)``
at the chosen token: the temperature-scaled distribution *before* top-k/top-p truncation
(``T = 1``, the model's plain ``log_softmax``, for greedy). It is what a full forward of the
sequence gives at that position (after dividing by ``T``), i.e. what an RL loss recomputes.

**Stopping and data parallelism.** A row stops after emitting ``eos_id`` (kept in its output) or
``max_new_tokens`` tokens; finished rows are padded with ``pad_id``. With data-parallel ranks
generating different prompts, pass ``group``: every step the ranks all-reduce whether any row is
still running, so all ranks run the same number of forwards and stop together (ZeRO-3 all-gathers
parameters inside every forward). All ranks of ``group`` must use the same ``max_new_tokens``.
Pass ``seed + dp_rank`` as the seed: TP ranks of one replica must draw the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron.model.kv_cache import KVCache
from megatron.model.layout import SequenceLayout

__all__ = [
    "GenerationOutput",
    "SamplingConfig",
    "generate",
    "greedy_generate",
    "row_uniforms",
]


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How tokens are chosen and how many.

    Raises:
        ValueError: naming the field, for a value outside its range.
    """

    max_new_tokens: int = 64
    """Most tokens generated per row (>= 1)."""
    temperature: float = 1.0
    """Divides the logits before sampling (>= 0); 0 = greedy (argmax; top_k/top_p unused)."""
    top_k: int = 0
    """Keep only the k most probable tokens (>= 0); 0 = no top-k."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most probable tokens up to this mass, in (0, 1]; 1 = off."""

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be an int >= 1, got {n!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(
                f"SamplingConfig.temperature must be a finite number >= 0, got {self.temperature}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be an int >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax (temperature 0)."""
        return self.temperature == 0


@dataclass
class GenerationOutput:
    """Generated continuations of a batch (prompts not included).

    Attributes:
        tokens: ``[b, n]`` int64 generated ids; ``pad_id`` after each row's end. ``n`` is the
            longest row's length on this rank.
        lengths: ``[b]`` int64 tokens generated per row (an emitted EOS counts).
        logprobs: ``[b, n]`` fp32 (fp64 for an fp64 model) ``log_softmax(logits / T)`` of each
            chosen token, ``T = 1`` for greedy (the distribution before top-k/top-p); 0 after a
            row's end.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    logprobs: torch.Tensor

    def to_lists(self) -> list[list[int]]:
        """Each row's generated ids, without padding."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist(), strict=True)]


def _prompt_rows(
    prompts: Sequence[Sequence[int]] | torch.Tensor, attention_mask: torch.Tensor | None
) -> list[list[int]]:
    """Token-id lists from a list of prompts, or a ``[b, s]`` tensor with its padding mask."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompt tensor must be [b, s], got shape {tuple(prompts.shape)}")
        if attention_mask is None:
            return prompts.tolist()
        if attention_mask.shape != prompts.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, prompts "
                f"{tuple(prompts.shape)}"
            )
        keep = attention_mask.to(torch.bool)
        return [row[m].tolist() for row, m in zip(prompts, keep, strict=True)]
    if attention_mask is not None:
        raise ValueError("attention_mask is only accepted with a [b, s] prompt tensor")
    return [[int(t) for t in p] for p in prompts]


def _check_rows(rows: list[list[int]], max_new_tokens: int, cfg: Any) -> None:
    if not rows:
        raise ValueError("generate needs at least one prompt")
    limit = cfg.max_position_embeddings
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty")
        if len(row) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {i}: {len(row)} tokens + max_new_tokens {max_new_tokens} exceed "
                f"model.max_position_embeddings ({limit})"
            )
        if min(row) < 0 or max(row) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")


def _left_padded(
    rows: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, SequenceLayout]:
    """``[b, P]`` tokens right-aligned, with positions and a padding mask (``segment_ids``)."""
    width = max(map(len, rows))
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows]).unsqueeze(1)  # [b, 1]
    col = torch.arange(width).unsqueeze(0)  # [1, P]
    pos = (col - (width - lengths)).clamp(min=0)  # [b, P]; 0 .. len-1 on the real tokens
    seg = (col >= width - lengths).long()  # [b, P]; 0 = left padding
    return tokens.to(device), SequenceLayout(pos.to(device), seg.to(device))


def _choose(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token ``[b]`` and its log-prob ``[b]`` from ``logits [b, v]`` (see the module doc).

    ``uniforms [b]`` fp64: this step's draws (per-row streams); ``None``: drawn from
    ``generator``."""
    if cfg.greedy:
        token = logits.argmax(dim=-1)
        return token, logits.log_softmax(-1).gather(-1, token.unsqueeze(-1)).squeeze(-1)
    scaled = logits / cfg.temperature  # [b, v]
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if 0 < cfg.top_k < scaled.shape[-1]:
        kth = scaled.topk(cfg.top_k, dim=-1).values[:, -1:]  # [b, 1]
        keep = scaled >= kth
    if cfg.top_p < 1:
        probs = scaled.masked_fill(~keep, -math.inf).softmax(-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        above = sorted_p.cumsum(-1) - sorted_p  # mass of the more probable tokens
        keep = keep & torch.zeros_like(keep).scatter(-1, order, above < cfg.top_p)
    probs = scaled.double().masked_fill(~keep, -math.inf).softmax(-1)  # [b, v] fp64
    cdf = probs.cumsum(-1)
    if uniforms is None:
        uniforms = torch.rand(
            logits.shape[0], generator=generator, dtype=torch.float64, device=cdf.device
        )
    u = uniforms.to(cdf.device).unsqueeze(1)  # [b, 1]
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    token = token.clamp(max=scaled.shape[-1] - 1)
    return token, scaled.log_softmax(-1).gather(-1, token.unsqueeze(-1)).squeeze(-1)


def row_uniforms(seeds: Sequence[int], n: int) -> torch.Tensor:
    """``[b, n]`` fp64 uniforms in [0, 1), row ``i`` from a CPU generator seeded with
    ``seeds[i]``: a row's draws depend on its own seed only, never on the other rows of the
    batch, its position in it, or the device."""
    out = torch.empty(len(seeds), n, dtype=torch.float64)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        out[i] = torch.rand(n, generator=g, dtype=torch.float64)
    return out


def _any_running(done: torch.Tensor, group: dist.ProcessGroup | None) -> bool:
    """Whether a row of any rank in ``group`` is still generating (a collective with a group)."""
    running = (~done).any().to(torch.int32).reshape(1)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(running, op=dist.ReduceOp.MAX, group=group)
    return bool(running.item())


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    sampling: SamplingConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    seed: int = 0,
    row_seeds: Sequence[int] | None = None,
    repeat: int = 1,
    group: dist.ProcessGroup | None = None,
    stop: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> GenerationOutput:
    """Continue every prompt of a batch with the key/value cache.

    Args:
        model: a :class:`GPTModel`, or a DeepSpeed engine wrapping one (``.module``); switched
            to eval mode here and restored afterwards.
        prompts: a list of token-id lists (any lengths), or a ``[b, s]`` int tensor.
        sampling: decoding settings (:class:`SamplingConfig`).
        attention_mask: ``[b, s]`` with a prompt tensor: 1 on prompt tokens, 0 on padding
            (left, right or both: a row's prompt is its tokens where the mask is 1, in order).
        eos_id: a row stops after emitting this id; ``None``: only ``max_new_tokens`` stops.
        pad_id: fills ``tokens`` after a row's end (default ``eos_id``, else 0).
        seed: seeds this call's ``torch.Generator`` (pass ``seed + dp_rank``: equal across TP
            ranks, different across data-parallel replicas). Unused for greedy.
        row_seeds: one seed per output row instead (:func:`row_uniforms`): each row's samples
            then depend only on its prompt and its seed, whichever rank or batch generates it
            (online RL seeds each completion by its place in the rollout, so any data-parallel
            layout samples the same completions). Unused for greedy.
        repeat: completions per prompt; output row ``i * repeat + j`` is prompt ``i``'s ``j``-th.
            Each prompt is run through the model once and its keys/values copied to its rows
            (online RL's G completions of a prompt share its prefill).
        group: ranks whose forwards must stay in lockstep (the data-parallel group under
            ZeRO-3, or the world); ``None``: stop as soon as this rank's rows are done.
        stop: ``stop(tokens [b, n] int64, lengths [b] int64) -> [b] bool``, asked after each
            step with the tokens so far: rows it marks are finished (their tokens kept, nothing
            more generated), e.g. when their decoded text holds a stop sequence (lm-eval's
            ``until``). With ``eos_id`` unset, a row ends only by ``max_new_tokens`` or ``stop``.

    Returns:
        A :class:`GenerationOutput` (tokens, lengths, log-probs; see the module doc).

    Raises:
        ValueError: for an empty prompt, ids outside the vocabulary, or
            ``len(prompt) + max_new_tokens > model.max_position_embeddings`` (naming the row).
    """
    inner = getattr(model, "module", model)
    rows = _prompt_rows(prompts, attention_mask)
    _check_rows(rows, sampling.max_new_tokens, inner.cfg)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
    device = inner.embedding.weight.device
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    tokens, layout = _left_padded(rows, device)
    b, n_max = len(rows) * repeat, sampling.max_new_tokens
    generator, uniforms = None, None
    if not sampling.greedy and row_seeds is not None:
        if len(row_seeds) != b:
            raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {b} rows")
        uniforms = row_uniforms(row_seeds, n_max).to(device)  # [b, n_max]
    elif not sampling.greedy:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache.for_model(inner, len(rows), tokens.shape[1] + n_max - 1)
        logits = model(tokens, layout, kv_cache=cache)  # [b / repeat, v]
        if repeat > 1:
            cache = cache.repeat_rows(repeat)
            logits = logits.repeat_interleave(repeat, dim=0)  # [b, v]
        out = torch.full((b, n_max), pad, dtype=torch.long, device=device)
        logps = torch.zeros(b, n_max, dtype=logits.dtype, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        lengths = torch.zeros(b, dtype=torch.long, device=device)
        for step in range(n_max):
            draws = None if uniforms is None else uniforms[:, step]
            token, logp = _choose(logits, sampling, generator, draws)
            out[:, step] = torch.where(done, pad, token)
            logps[:, step] = torch.where(done, 0.0, logp)
            lengths += (~done).long()
            if eos_id is not None:
                done = done | (token == eos_id)
            if stop is not None:
                done = done | stop(out[:, : step + 1], lengths).to(done.device)
            # without eos_id or stop every rank runs max_new_tokens steps: no need to ask
            early = eos_id is not None or stop is not None
            if step + 1 == n_max or (early and not _any_running(done, group)):
                break
            # finished rows feed their (unused) draw: always a valid id, unlike pad_id
            logits = model(token.unsqueeze(1), kv_cache=cache)  # [b, 1] -> [b, v]
    finally:
        model.train(was_training)
    n = int(lengths.max())
    return GenerationOutput(tokens=out[:, :n], lengths=lengths, logprobs=logps[:, :n])


def greedy_generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    eos_id: int | None = None,
) -> list[int]:
    """Greedy (argmax) continuation of one prompt: :func:`generate` with temperature 0.

    Args:
        model: a :class:`GPTModel` (switched to eval mode here; restored afterwards).
        prompt_ids: the prompt's token ids (non-empty), a sequence or ``[s]`` int tensor.
        max_new_tokens: most tokens to generate.
        eos_id: stop after generating this id (it is included in the result); ``None``: never.

    Returns:
        The generated ids (without the prompt).
    """
    ids = [int(t) for t in prompt_ids]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    return generate(model, [ids], sampling, eos_id=eos_id).to_lists()[0]
