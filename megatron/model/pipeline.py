"""The GPT model as DeepSpeed pipeline stages (``PipelineModule``).

Shapes: b batch, s sequence, h hidden, v padded vocabulary, p TP size.

Stage functions pass one tuple between pipeline stages::

    (hidden [b, s, h] float, position_ids [b, s] int64, segment_ids [b, s] | [b, 1] int64,
     prefix_ids [b, s] | [b, 1] int64, targets [b, s] int64, extra [2, k + 1] int64)

the layout as :meth:`~megatron.model.layout.SequenceLayout.to_tensors` packs it (a ``[b, 1]``
tensor stands for "absent", because pipeline messages must be tensors) and the extra targets of
prefix-shared rows (flat hidden-state index and token id, after a placeholder column). The first stage embeds
``tokens``; the last one turns the final-norm hidden states into the per-token outputs the model
was built with (:mod:`megatron.model.output`: log-probs of ``targets`` through the vocab-parallel
``lm_head``, chunked). The objective is evaluated on the last stage by DeepSpeed's ``loss_fn``
(:class:`megatron.training.pipeline_step.PipelineLoss`).

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

from megatron.model.gpt import _seeded, _TrackerReplay
from megatron.model.layout import SequenceLayout
from megatron.model.output import resolve_outputs, token_log_probs
from megatron.model.transformer import TransformerLayer, build_norm
from megatron.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, normal_init
from megatron.parallel.random import RNGStatesTracker
from megatron.parallel.state import ParallelState

Activations = tuple[torch.Tensor, ...]
LM_STAGE_OUTPUTS = (
    "token_logps",
    "log_z",
    "log_sum_sq_probs",
    "extra_logps",
    "extra_log_sum_sq_probs",
)
"""Order of the last stage's output tuple (an output not requested is an empty tensor)."""


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
        tokens, *rest = inputs
        x = super().forward(tokens)  # [b, s, h]
        if self.dropout and self.training:
            x = nn.functional.dropout(x, self.dropout)
        return (x, *rest)


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
        x, position_ids, segment_ids, prefix_ids, *rest = inputs
        layout = SequenceLayout.from_tensors(position_ids, segment_ids, prefix_ids)
        return super().forward(x, layout), position_ids, segment_ids, prefix_ids, *rest


class FinalNormPipe(nn.Module):
    """The final norm as a stage function (state dict keys ``norm.*``)."""

    def __init__(self, cfg: Any, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        with _seeded(seed):
            self.norm = build_norm(cfg, dtype)

    def forward(self, inputs: Activations) -> Activations:
        x, *rest = inputs
        return (self.norm(x), *rest)


def unpack_extra(extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [k], targets [k])`` of the message's ``extra`` ``[2, k + 1]`` (see
    :meth:`megatron.data.batch.Batch.pipeline_inputs`; column 0 is a placeholder)."""
    return extra[0, 1:], extra[1, 1:]


def _log_probs(
    weight: torch.Tensor,
    cfg: Any,
    state: ParallelState,
    outputs: frozenset[str],
    inputs: Activations,
) -> tuple[torch.Tensor, ...]:
    hidden, targets = inputs[0], inputs[4]
    index, extra_targets = unpack_extra(inputs[5])
    out = token_log_probs(
        hidden, weight, targets, state.tp_group, cfg.vocab_size, outputs,
        extra_index=index, extra_targets=extra_targets,
    )  # fmt: skip
    empty = out["extra_logps"].new_zeros(0)  # an output not asked for
    return tuple(out.get(k, empty) for k in LM_STAGE_OUTPUTS)


def stage_outputs(values: torch.Tensor | tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """The last stage's return value as the model's named outputs (what objectives read)."""
    if torch.is_tensor(values):  # ValueHeadPipe
        return {"values": values}
    out = dict(zip(LM_STAGE_OUTPUTS, values, strict=True))
    for name in ("log_sum_sq_probs", "extra_log_sum_sq_probs"):
        if out[name].numel() == 0 and out["token_logps"].numel() > 0:
            del out[name]  # not requested (the tuple has a fixed arity)
    return out


class LMHeadPipe(ColumnParallelLinear):
    """Last stage (untied): hidden states -> the requested outputs ``[b, s]`` fp32, in the order
    of :data:`LM_STAGE_OUTPUTS`."""

    def __init__(
        self,
        cfg: Any,
        state: ParallelState,
        seed: int,
        dtype: torch.dtype,
        outputs: frozenset[str],
    ) -> None:
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
        self.cfg, self.state, self.outputs = cfg, state, outputs

    def forward(self, inputs: Activations) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return _log_probs(self.weight, self.cfg, self.state, self.outputs, inputs)


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


def tied_head_forward(module: TiedEmbeddingPipe, inputs: Activations):
    """Last-stage use of the tied embedding: its rows project hidden states to log-probs."""
    return _log_probs(
        module.weight, module.cfg_for_head, module.state_for_head, module.outputs, inputs
    )


class TiedEmbeddingPipe(EmbeddingPipe):
    """Embedding that the last stage reuses as ``lm_head`` (``model.tie_word_embeddings``)."""

    def __init__(
        self,
        cfg: Any,
        state: ParallelState,
        seed: int,
        dtype: torch.dtype,
        outputs: frozenset[str],
    ) -> None:
        super().__init__(cfg, state, seed, dtype)
        self.cfg_for_head, self.state_for_head, self.outputs = cfg, state, outputs


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
    outputs: frozenset[str] | None = None,
) -> Any:
    """A DeepSpeed ``PipelineModule`` of the GPT model over ``state.pp_size`` stages.

    Args:
        cfg: the ``model`` config section.
        state: the parallel grid (its TP group is used inside the layers).
        tracker: RNG streams for TP-sharded dropout.
        seed: initialisation seed (stage seeds as in :class:`GPTModel`).
        loss_fn: DeepSpeed ``loss_fn(outputs, labels)`` evaluated on the last stage.
        dtype: parameter dtype.
        outputs: the last stage's per-token outputs (``None``: the head's defaults), as for
            :class:`~megatron.model.gpt.GPTModel`.

    Returns:
        The ``PipelineModule`` (layers partitioned so the transformer layers are balanced).
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    n = cfg.num_layers
    head = getattr(cfg, "head", "lm")
    outputs = resolve_outputs(head, outputs)
    if head == "value":  # a reward model: no output projection to tie
        first = LayerSpec(EmbeddingPipe, cfg, state, seed, dtype)
        last = LayerSpec(ValueHeadPipe, cfg, seed + 1 + n, dtype)
    elif cfg.tie_word_embeddings:
        tied = ("embedding", TiedEmbeddingPipe, cfg, state, seed, dtype, outputs)
        first = TiedLayerSpec(*tied)
        last = TiedLayerSpec(*tied, forward_fn=tied_head_forward)
    else:
        first = LayerSpec(EmbeddingPipe, cfg, state, seed, dtype)
        last = LayerSpec(LMHeadPipe, cfg, state, seed + 1 + n, dtype, outputs)
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


def mark_tied_duplicates(module: Any) -> None:
    """Flag the later stages' copies of tied weights (``tied_duplicate``) so that a global
    gradient norm counts each tied weight once."""
    import torch.distributed as dist

    rank = dist.get_rank()
    for key, comm in getattr(module, "tied_comms", {}).items():
        if rank != min(comm["ranks"]):
            for p in module.tied_modules[key].parameters():
                p.tied_duplicate = True
