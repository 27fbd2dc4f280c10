"""The typed micro-batch that collators produce and steps, references and objectives read.

Shapes: b rows, s row length, N ``num_sequences``, P pairs, n examples, k extra targets.

A :class:`Batch` holds the model inputs (``tokens``, ``layout``), what is scored (``targets``,
``loss_mask``, optional :class:`ExtraTargets`), which sequence each scored token belongs to
(``sequence_ids``, ``num_sequences``), per-example metadata of its batch kind (``margin``,
``labels``, ``kl_start``, ``prompt_lengths``, ``score_index``), the dataset rows it came from
(``example_ids``: reference-cache rows) and named sub-batches forwarded separately (KTO's KL
sequences, :data:`KL_SEQUENCES`). See :mod:`megatron.data.collators` for how each kind fills it.

Pipeline parallelism splits a batch in two tensor tuples: the first stage's inputs
(:meth:`Batch.pipeline_inputs`) and the last stage's labels (:meth:`Batch.pipeline_labels`),
rebuilt there by :meth:`Batch.from_pipeline_labels` with the field list the step recorded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from megatron.model.layout import SequenceLayout

KL_SEQUENCES = "kl"
"""Sub-batch name of an unpaired batch's KL sequences (``prompt_i + kl_completion_i``)."""


@dataclass(frozen=True)
class ExtraTargets:
    """Targets scored at a hidden state other than the next position's.

    Attributes:
        index: ``[k]`` int64 flat ``row * s + column`` index of the hidden state that scores
            each target.
        targets: ``[k]`` int64 token ids.
        sequence_ids: ``[k]`` int64 sequence each target counts for (-1: none).
    """

    index: torch.Tensor
    targets: torch.Tensor
    sequence_ids: torch.Tensor

    def to(self, device: torch.device) -> ExtraTargets:
        """The tensors on ``device``."""
        return ExtraTargets(*(t.to(device, non_blocking=True) for t in dataclasses.astuple(self)))


@dataclass(frozen=True)
class RolloutFields:
    """What online RL's losses read besides the policy's log-probs (one micro-batch of sampled
    completions, laid out like any sequence batch or in prefix-shared spans; N completions).
    Per-token values are flat ``[b * s + k]``: the ``[b, s]`` grid flattened, then the ``k``
    extra targets (:func:`megatron.objectives.online.flat_outputs`); 0 where nothing is scored.

    Attributes:
        advantages: ``[N]`` fp32 per completion.
        old_logps: ``[b * s + k]`` fp32 the sampling policy's log-probs of the targets (computed
            at the rollout when the policy changes before this batch is trained on), or ``None``.
        ref_logps: ``[b * s + k]`` fp32 the reference model's (objectives with a KL term), or
            ``None``.
        sampler_logps: ``[b * s + k]`` fp32 the log-probs the generation backend reported, on
            batches whose policy is still the sampling one (``sampling/logp_difference``), or
            ``None``.
        num_items: completion tokens of the whole optimizer step (all ranks and micro-batches)
            divided by data-parallel size x accumulation steps (DAPO's normalisation).
        max_new_tokens: the rollout's ``max_new_tokens`` (Dr. GRPO's normalisation).
    """

    advantages: torch.Tensor
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    sampler_logps: torch.Tensor | None = None
    num_items: float = 1.0
    max_new_tokens: int = 1

    def to(self, device: torch.device) -> RolloutFields:
        """The tensors on ``device``."""
        changes = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if torch.is_tensor(getattr(self, f.name))
        }
        return dataclasses.replace(self, **changes)


# Per-example / per-sequence fields that travel to the pipeline's last stage (as tensors).
_LABEL_TENSORS = (
    "loss_mask",
    "sequence_ids",
    "example_ids",
    "margin",
    "labels",
    "prompt_lengths",
    "score_index",
)
_LABEL_INTS = ("num_sequences", "kl_start")


@dataclass
class Batch:
    """One micro-batch (see the module docstring).

    Attributes:
        tokens: ``[b, s]`` int64 input ids.
        targets: ``[b, s]`` int64 id each position is scored against (a valid id where not).
        loss_mask: ``[b, s]`` float32, 1 on the scored (trained) targets.
        layout: positions and segment structure of the rows.
        sequence_ids: ``[b, s]`` int64 sequence of each scored target (-1 elsewhere), or ``None``
            for a batch of fixed windows (the ``text`` format).
        num_sequences: N, the sequences that ``sequence_ids`` number.
        extra_targets: targets read from another position (prefix-shared rows), or ``None``.
        example_ids: ``[n]`` int64 dataset rows of the examples (set by the trainer).
        margin: ``[P]`` float32 pair margins (pair batches whose data has them).
        labels: ``[n]`` bool desirable flags (unpaired batches).
        kl_start: index of the first KL sequence when they follow the examples (unpaired).
        prompt_lengths: ``[n]`` int64 (prompt batches).
        score_index: ``[N]`` int64 flat index of the token each sequence is scored at (reward
            models' value head).
        sub_batches: named batches forwarded separately (:data:`KL_SEQUENCES`).
        stats: collator statistics (``packing_efficiency``, ``real_tokens``), plain floats.
        dp_means: data-parallel means an objective asked for (``Objective.dp_means``), set by
            :func:`megatron.objectives.registry.loss_with_dp_means`.
        rollout: online RL's per-completion inputs (:class:`RolloutFields`), or ``None``.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    layout: SequenceLayout
    sequence_ids: torch.Tensor | None = None
    num_sequences: int = 0
    extra_targets: ExtraTargets | None = None
    example_ids: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    kl_start: int | None = None
    prompt_lengths: torch.Tensor | None = None
    score_index: torch.Tensor | None = None
    sub_batches: dict[str, Batch] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    dp_means: dict[str, torch.Tensor] | None = None
    rollout: RolloutFields | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(b, s)``."""
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def replace(self, **changes) -> Batch:
        """A copy with some fields replaced (the batch itself is never mutated by consumers)."""
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device) -> Batch:
        """The batch (and its sub-batches) with every tensor on ``device``."""
        changes: dict = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                changes[f.name] = v.to(device, non_blocking=True)
            elif isinstance(v, SequenceLayout | ExtraTargets | RolloutFields):
                changes[f.name] = v.to(device)
        changes["sub_batches"] = {k: b.to(device) for k, b in self.sub_batches.items()}
        if self.dp_means is not None:
            changes["dp_means"] = {k: v.to(device) for k, v in self.dp_means.items()}
        return self.replace(**changes)

    # ---- pipeline messages --------------------------------------------------------------------
    def pipeline_inputs(self) -> tuple[torch.Tensor, ...]:
        """``(tokens, position_ids, segment_ids, prefix_ids, targets, extra)`` for the first stage.

        ``extra`` is ``[2, k + 1]`` int64: column 0 a placeholder (pipeline messages must not be
        empty), then the extra targets' flat hidden-state indices (row 0) and token ids (row 1);
        the last stage scores them (:func:`megatron.model.pipeline.unpack_extra`).
        """
        extra = torch.zeros(2, 1, dtype=torch.long, device=self.tokens.device)
        if self.extra_targets is not None:
            pairs = torch.stack([self.extra_targets.index, self.extra_targets.targets])
            extra = torch.cat([extra, pairs.to(extra)], dim=1)
        return (self.tokens, *self.layout.to_tensors(), self.targets, extra)

    def label_fields(self) -> tuple[str, ...]:
        """The fields :meth:`pipeline_labels` sends, in order (the same for every micro-batch of
        one step, since one collator makes them)."""
        present = tuple(f for f in _LABEL_TENSORS if getattr(self, f) is not None)
        extra = ("extra_targets",) if self.extra_targets is not None else ()
        return present + extra + tuple(f for f in _LABEL_INTS if getattr(self, f) is not None)

    def pipeline_labels(self, fields: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        """The last stage's labels: ``fields`` of this batch as tensors."""
        if self.sub_batches:
            raise ValueError(
                f"sub-batches ({sorted(self.sub_batches)}) cannot travel through a pipeline; "
                "the objective's collate_options(pipeline=True) must not ask for them"
            )
        return tuple(self._label(f) for f in fields)

    def _label(self, name: str) -> torch.Tensor:
        if name == "extra_targets":  # [3, k]: index, targets, sequence_ids
            return torch.stack(list(dataclasses.astuple(self.extra_targets)))
        return torch.as_tensor(getattr(self, name))

    @classmethod
    def from_pipeline_labels(
        cls, labels: tuple[torch.Tensor, ...], fields: tuple[str, ...]
    ) -> Batch:
        """The last stage's view of a batch: its label fields; the inputs stay on the first
        stage (``tokens``/``targets`` are empty ``[b, 0]`` placeholders)."""
        values: dict = dict(zip(fields, labels, strict=True))
        if "extra_targets" in values:
            values["extra_targets"] = ExtraTargets(*values["extra_targets"].unbind(0))
        for f in _LABEL_INTS:
            if f in values:
                values[f] = int(values[f])
        b = values["loss_mask"].shape[0]
        device = values["loss_mask"].device
        empty = torch.zeros(b, 0, dtype=torch.long, device=device)
        return cls(
            tokens=empty,
            targets=empty,
            layout=SequenceLayout(position_ids=empty),
            **values,
        )
