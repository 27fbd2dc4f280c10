"""The GPT model as DeepSpeed pipeline stages (``PipelineModule``).

Shapes: b batch, s sequence, h hidden, v padded vocabulary, p TP size.

Stage functions pass one tuple between pipeline stages::

    (hidden [b, s, h] float, position_ids [b, s] int64, segment_ids [b, s] | [b, 1] int64,
     targets [b, s] int64)

A ``[b, 1]`` segment tensor stands for "no segment layout" (one causal sequence per row), because
pipeline messages must be tensors. The first stage embeds ``tokens``; the last one applies the final
norm and turns hidden states into per-token log-probs of ``targets`` through the vocab-parallel
``lm_head`` (chunked, :func:`megatron.parallel.chunked_vocab_parallel_log_probs`). The objective is
evaluated by :class:`PipelineLoss` (DeepSpeed's ``loss_fn``) on those log-probs and the batch's
other fields.

Each stage module subclasses the corresponding module of :class:`~megatron.model.gpt.GPTModel`
and is initialised with the same per-stage seed, so a pipelined model holds exactly the weights of
the unpipelined one and its per-layer state dicts use the same keys (``layer_00`` = embedding,
``layer_01 + i`` = transformer layer i, then final norm and lm_head — or, for a reward model, the
value head, :class:`ValueHeadPipe`, whose stage returns ``values [b, s]`` instead).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.model.attention import SequenceLayout
from megatron.model.gpt import _seeded, _TrackerReplay
from megatron.model.transformer import TransformerLayer, build_norm
from megatron.objectives.logprobs import token_log_probs
from megatron.objectives.registry import evaluate
from megatron.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, normal_init
from megatron.parallel.random import RNGStatesTracker
from megatron.parallel.state import ParallelState

Activations = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# Whether the last stage also returns log sum_v p_v^2 (set from the objective's policy_outputs by
# build_pipeline_model; a one-element list so stage functions built by DeepSpeed see it).
WITH_SUM_SQ = [False]


def pack_segments(segment_ids: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """Segment ids for the pipeline message (``[b, 1]`` zeros when there is no layout)."""
    if segment_ids is None:
        return torch.zeros(tokens.shape[0], 1, dtype=torch.long, device=tokens.device)
    return segment_ids


def unpack_layout(position_ids: torch.Tensor, segment_ids: torch.Tensor) -> SequenceLayout:
    seg = None if segment_ids.shape[1] != position_ids.shape[1] else segment_ids
    return SequenceLayout(position_ids, seg)


class EmbeddingPipe(VocabParallelEmbedding):
    """First stage: ``(tokens, position_ids, segment_ids, targets)`` -> activations."""

    def __init__(self, cfg: Any, state: ParallelState, seed: int, dtype: torch.dtype) -> None:
        with _seeded(seed):
            super().__init__(
                cfg.padded_vocab_size,
                cfg.hidden_size,
                state=state,
                init_method=normal_init(cfg.init_method_std),
                dtype=dtype,
            )
        self.dropout = cfg.hidden_dropout

    def forward(self, inputs: Activations) -> Activations:  # type: ignore[override]
        tokens, position_ids, segment_ids, targets = inputs
        x = super().forward(tokens)  # [b, s, h]
        if self.dropout and self.training:
            x = nn.functional.dropout(x, self.dropout)
        return x, position_ids, segment_ids, targets


class TransformerLayerPipe(TransformerLayer):
    """One decoder layer as a pipeline stage function."""

    def __init__(
        self,
        cfg: Any,
        state: ParallelState,
        tracker: RNGStatesTracker,
        seed: int,
        dtype: torch.dtype,
    ) -> None:
        with _seeded(seed):
            super().__init__(cfg, state, tracker, dtype)

    def forward(self, inputs: Activations) -> Activations:  # type: ignore[override]
        x, position_ids, segment_ids, targets = inputs
        x = super().forward(x, unpack_layout(position_ids, segment_ids))
        return x, position_ids, segment_ids, targets


class FinalNormPipe(nn.Module):
    """The final norm as a stage function (state dict keys ``norm.*``)."""

    def __init__(self, cfg: Any, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        with _seeded(seed):
            self.norm = build_norm(cfg, dtype)

    def forward(self, inputs: Activations) -> Activations:
        x, position_ids, segment_ids, targets = inputs
        return self.norm(x), position_ids, segment_ids, targets


class _OutputWeightView(nn.Module):
    """Adapter giving :func:`token_log_probs` what it reads from a model."""

    def __init__(self, weight: torch.Tensor, cfg: Any, state: ParallelState, chunk: int | None):
        super().__init__()
        self._weight, self.cfg, self.state, self.chunk = weight, cfg, state, chunk

    def output_weight(self) -> torch.Tensor:
        return self._weight


def _log_probs(weight: torch.Tensor, cfg: Any, state: ParallelState, inputs: Activations):
    hidden, _, _, targets = inputs
    view = _OutputWeightView(weight, cfg, state, None)
    view.with_sum_sq = WITH_SUM_SQ[0]
    out = token_log_probs(view, hidden, targets, view.chunk)
    if "log_sum_sq_probs" in out:
        return out["token_logps"], out["log_z"], out["log_sum_sq_probs"]
    return out["token_logps"], out["log_z"]


class LMHeadPipe(ColumnParallelLinear):
    """Last stage (untied): hidden states -> ``(token_logps [b, s], log_z [b, s])`` fp32."""

    def __init__(self, cfg: Any, state: ParallelState, seed: int, dtype: torch.dtype) -> None:
        with _seeded(seed):
            # why: GPTModel draws the final norm's parameters (none random) and then lm_head under
            # this seed; drawing nothing first keeps the two initialisations identical.
            super().__init__(
                cfg.hidden_size,
                cfg.padded_vocab_size,
                state=state,
                bias=False,
                init_method=normal_init(cfg.init_method_std),
                dtype=dtype,
            )
        self.cfg, self.state = cfg, state

    def forward(self, inputs: Activations) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return _log_probs(self.weight, self.cfg, self.state, inputs)


class ValueHeadPipe(nn.Module):
    """Last stage of a reward model (``model.head: value``): hidden states -> ``values [b, s]`` fp32.

    Initialised as :class:`~megatron.model.gpt.GPTModel`'s ``value_head`` (same seed, same draws).
    """

    def __init__(self, cfg: Any, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        with _seeded(seed):
            self.value = nn.Linear(cfg.hidden_size, 1, bias=False, dtype=dtype)
            nn.init.normal_(self.value.weight, std=(cfg.hidden_size + 1) ** -0.5)

    def forward(self, inputs: Activations) -> torch.Tensor:
        hidden = inputs[0]
        return self.value(hidden).squeeze(-1).float()


def tied_head_forward(module: EmbeddingPipe, inputs: Activations):
    """Last-stage use of the tied embedding: its rows project hidden states to log-probs."""
    return _log_probs(module.weight, module.cfg_for_head, module.state_for_head, inputs)


class TiedEmbeddingPipe(EmbeddingPipe):
    """Embedding that the last stage reuses as ``lm_head`` (``model.tie_word_embeddings``)."""

    def __init__(self, cfg: Any, state: ParallelState, seed: int, dtype: torch.dtype) -> None:
        super().__init__(cfg, state, seed, dtype)
        self.cfg_for_head, self.state_for_head = cfg, state


def checkpoint_function(tracker: RNGStatesTracker):
    """DeepSpeed ``activation_checkpoint_func``: torch's non-reentrant checkpoint that also
    replays the TP dropout stream (see :class:`megatron.model.gpt._TrackerReplay`)."""

    def run(fn, *args):
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_TrackerReplay(tracker))

    return run


def build_pipeline_model(
    cfg: Any,
    state: ParallelState,
    tracker: RNGStatesTracker,
    seed: int,
    loss_fn: Any,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A DeepSpeed ``PipelineModule`` of the GPT model over ``state.pp_size`` stages.

    Args:
        cfg: the ``model`` config section.
        state: the parallel grid (its TP group is used inside the layers).
        tracker: RNG streams for TP-sharded dropout.
        seed: initialisation seed (stage seeds as in :class:`GPTModel`).
        loss_fn: DeepSpeed ``loss_fn(outputs, labels)`` evaluated on the last stage.
        dtype: parameter dtype.

    Returns:
        The ``PipelineModule`` (layers partitioned so the transformer layers are balanced).
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    WITH_SUM_SQ[0] = "log_sum_sq_probs" in getattr(loss_fn.objective, "policy_outputs", ())
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    n = cfg.num_layers
    if getattr(cfg, "head", "lm") == "value":  # a reward model: no output projection to tie
        first = LayerSpec(EmbeddingPipe, cfg, state, seed, dtype)
        last = LayerSpec(ValueHeadPipe, cfg, seed + 1 + n, dtype)
    elif cfg.tie_word_embeddings:
        first = TiedLayerSpec("embedding", TiedEmbeddingPipe, cfg, state, seed, dtype)
        last = TiedLayerSpec(
            "embedding", TiedEmbeddingPipe, cfg, state, seed, dtype, forward_fn=tied_head_forward
        )
    else:
        first = LayerSpec(EmbeddingPipe, cfg, state, seed, dtype)
        last = LayerSpec(LMHeadPipe, cfg, state, seed + 1 + n, dtype)
    specs = [
        first,
        *[
            LayerSpec(TransformerLayerPipe, cfg, state, tracker, seed + 1 + i, dtype)
            for i in range(n)
        ],
        LayerSpec(FinalNormPipe, cfg, seed + 1 + n, dtype),
        last,
    ]
    topology = PipeModelDataParallelTopology(
        num_pp=state.pp_size, num_mp=state.tp_size, num_dp=state.dp_size
    )
    module = PipelineModule(
        layers=specs,
        topology=topology,
        loss_fn=loss_fn,
        partition_method="type:TransformerLayerPipe",
        activation_checkpoint_interval=1 if cfg.activation_checkpointing else 0,
        activation_checkpoint_func=checkpoint_function(tracker),
        checkpointable_layers=["TransformerLayerPipe"],
        dynamic_shape=True,
    )
    module.model_head = getattr(cfg, "head", "lm")  # read when loading weights (head swaps)
    return module


class PipelineLoss:
    """DeepSpeed ``loss_fn``: evaluates the objective on the last stage.

    ``labels`` is the tuple of the batch's other tensors in the order of :attr:`keys` (set by the
    step before each batch). Metrics of each micro-batch are kept in :attr:`metrics` for the step
    to collect, since the pipeline engine only returns the loss.
    """

    def __init__(self, objective: Any) -> None:
        self.objective = objective
        self.reference: Any = None  # a ReferenceProvider (cache lookups) when the run has one
        self.dp_group: Any = None  # reduces the objective's dp_means (set by the trainer)
        self.keys: list[str] = []
        self.metrics: list[dict[str, torch.Tensor]] = []

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: tuple) -> torch.Tensor:
        batch = dict(zip(self.keys, labels, strict=True))
        ref = self.reference(batch) if self.reference is not None else None
        if torch.is_tensor(outputs):  # ValueHeadPipe
            policy = {"values": outputs}
        else:
            policy = {"token_logps": outputs[0], "log_z": outputs[1]}
            if len(outputs) > 2:
                policy["log_sum_sq_probs"] = outputs[2]
        loss, metrics = evaluate(self.objective, policy, ref, batch, self.dp_group)
        detached = {
            k: tuple(x.detach() for x in v) if isinstance(v, tuple) else v.detach()
            for k, v in metrics.items()
        }
        self.metrics.append({"loss": loss.detach(), **detached})
        return loss


def mark_tied_duplicates(module: Any) -> None:
    """Flag the later stages' copies of tied weights (``tied_duplicate``) so that a global
    gradient norm counts each tied weight once."""
    import torch.distributed as dist

    rank = dist.get_rank()
    for key, comm in getattr(module, "tied_comms", {}).items():
        if rank != min(comm["ranks"]):
            for p in module.tied_modules[key].parameters():
                p.tied_duplicate = True
