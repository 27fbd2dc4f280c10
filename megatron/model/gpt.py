"""GPT decoder assembled from tensor-parallel layers.

Shapes: b batch, s sequence, h hidden, v padded vocabulary, p TP size.

The model is a flat sequence of stages — embedding, ``num_layers`` transformer layers, final
norm — so DeepSpeed's ``PipelineModule`` can partition it (see :meth:`GPTModel.stages`). It returns
final hidden states, or the per-token outputs it was built to give (``outputs``, see
:mod:`megatron.model.output`): log-probabilities through the vocab-parallel ``lm_head`` in chunks,
never as full fp32 logits, or a reward model's values.

Initialisation is deterministic per stage (seed + stage index), independent of the TP size and of
which stages a pipeline rank builds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.model.kv_cache import KVCache
from megatron.model.layout import SequenceLayout
from megatron.model.output import resolve_outputs, token_log_probs
from megatron.model.transformer import TransformerLayer, build_norm
from megatron.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, normal_init
from megatron.parallel.mappings import gather_from_tensor_parallel_region
from megatron.parallel.random import RNGStatesTracker, add_model_parallel_stream
from megatron.parallel.state import ParallelState

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _TrackerReplay:
    """``context_fn`` for non-reentrant checkpointing that replays the TP RNG stream.

    torch's checkpoint restores the default generator for the recomputation; the model-parallel
    stream lives in our tracker, so we snapshot it before the forward and swap the snapshot in
    while recomputing (Megatron-LM does the same in its ``CheckpointFunction``).
    """

    def __init__(self, tracker: RNGStatesTracker) -> None:
        self.tracker = tracker
        self.snapshot = tracker.state_dict()

    @contextlib.contextmanager
    def recompute(self):
        current = self.tracker.state_dict()
        self.tracker.load_state_dict(self.snapshot)
        try:
            yield
        finally:
            self.tracker.load_state_dict(current)

    def __call__(self):
        return contextlib.nullcontext(), self.recompute()


class GPTModel(nn.Module):
    """Decoder-only transformer.

    Args:
        cfg: the ``model`` config section (derived fields resolved).
        state: the parallel grid (only TP is used inside the model).
        tracker: RNG streams for TP-sharded dropout.
        seed: initialisation seed.
        dtype: parameter dtype.
        outputs: the per-token outputs :meth:`forward` gives when called with ``targets``
            (names in :mod:`megatron.model.output`; ``None``: the head's defaults,
            ``token_logps`` + ``log_z`` or ``values``). Objectives declare theirs
            (``Objective.model_outputs``).
        logprob_chunk_size: tokens per chunk of the vocabulary projection (``None``: ~256 MiB
            of fp32 logits per chunk).
        logprob_temperature: the per-token outputs are those of ``softmax(logits / T)``: online
            RL scores sampled tokens under the distribution they were sampled from (the
            decoder's log-probs, and TRL's ``logits / temperature``). Generation is unaffected
            (the sampler applies its own temperature).
    """

    def __init__(
        self,
        cfg: Any,
        state: ParallelState,
        tracker: RNGStatesTracker | None = None,
        seed: int = 1234,
        dtype: torch.dtype = torch.float32,
        outputs: Iterable[str] | None = None,
        logprob_chunk_size: int | None = None,
        logprob_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not logprob_temperature > 0:
            raise ValueError(f"logprob_temperature must be > 0, got {logprob_temperature}")
        self.logprob_temperature = float(logprob_temperature)
        self.cfg, self.state = cfg, state
        self.outputs = resolve_outputs(getattr(cfg, "head", "lm"), outputs)
        if tracker is None:
            tracker = RNGStatesTracker()
            add_model_parallel_stream(tracker, seed, state.tp_rank)
        self.tracker = tracker
        init = normal_init(cfg.init_method_std)
        with _seeded(seed):
            self.embedding = VocabParallelEmbedding(
                cfg.padded_vocab_size, cfg.hidden_size, state=state, init_method=init, dtype=dtype
            )
        self.layers = nn.ModuleList()
        for i in range(cfg.num_layers):
            with _seeded(seed + 1 + i):
                self.layers.append(TransformerLayer(cfg, state, self.tracker, dtype))
        with _seeded(seed + 1 + cfg.num_layers):
            self.final_norm = build_norm(cfg, dtype)
            self.lm_head = None
            self.value_head = None
            if getattr(cfg, "head", "lm") == "value":
                # why: the reward-model head of Stiennon et al. (arXiv:2009.01325, App. B.2):
                # N(0, 1/(h + 1)) weights, so the initial rewards have unit-order variance; no
                # bias (HF's *ForSequenceClassification.score has none; Bradley-Terry ignores it).
                self.value_head = nn.Linear(cfg.hidden_size, 1, bias=False, dtype=dtype)
                if not self.value_head.weight.is_meta:  # see normal_init
                    nn.init.normal_(self.value_head.weight, std=(cfg.hidden_size + 1) ** -0.5)
            elif not cfg.tie_word_embeddings:
                self.lm_head = ColumnParallelLinear(
                    cfg.hidden_size,
                    cfg.padded_vocab_size,
                    state=state,
                    bias=False,
                    init_method=init,
                    dtype=dtype,
                )
        self.embedding_dropout = cfg.hidden_dropout
        self.activation_checkpointing = cfg.activation_checkpointing
        self.logprob_chunk_size = logprob_chunk_size

    def output_weight(self) -> torch.Tensor:
        """This rank's ``[v/p, h]`` output-projection rows (the embedding when tied)."""
        if self.value_head is not None:
            raise ValueError("a model.head: value model has no output projection (no log-probs)")
        return self.embedding.weight if self.lm_head is None else self.lm_head.weight

    def _layer(self, layer: TransformerLayer, x: torch.Tensor, layout: SequenceLayout):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                layer, x, layout, use_reentrant=False, context_fn=_TrackerReplay(self.tracker)
            )
        return layer(x, layout)

    def forward(
        self,
        tokens: torch.Tensor,
        layout: SequenceLayout | None = None,
        targets: torch.Tensor | None = None,
        extra_index: torch.Tensor | None = None,
        extra_targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        kl_reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """``tokens [b, s]`` int64 -> final hidden states ``[b, s, h]``.

        With ``targets [b, s]`` it returns the outputs the model was built with instead (a dict
        of ``[b, s]`` fp32 tensors, :mod:`megatron.model.output`), computed inside the forward
        so that engines that gather parameters only during ``forward`` (ZeRO-3) see the output
        weight. ``extra_index [k]`` / ``extra_targets [k]`` add ``extra_logps [k]``: targets
        scored at hidden states other than the next position's (prefix-shared rows). A
        ``model.head: value`` model returns ``{"values": [b, s] fp32}`` (the value head at
        every position; ``targets`` unused).

        ``kl_reference``: ``(hidden [b, s, h], output weight [v/p, h])`` of a frozen reference
        model over the same tokens (:meth:`ReferenceModel.kl_inputs
        <megatron.training.reference.ReferenceModel.kl_inputs>`), for the ``kl`` output (the
        exact per-token KL to the reference, at this model's ``logprob_temperature``).

        With ``kv_cache`` (:class:`~megatron.model.kv_cache.KVCache`) it is one incremental
        decoding step instead, see :meth:`_decode_step`: it returns the next-token logits
        ``[b, vocab_size]`` of each row's last real token (inside the forward, for ZeRO-3).
        """
        if kv_cache is not None:
            return self._decode_step(tokens, layout, kv_cache)
        if layout is None:
            layout = SequenceLayout.causal(*tokens.shape, device=tokens.device)
        x = self.embedding(tokens)  # [b, s, h]
        if self.embedding_dropout and self.training:
            x = torch.nn.functional.dropout(x, self.embedding_dropout)
        for layer in self.layers:
            x = self._layer(layer, x, layout)
        hidden = self.final_norm(x)
        if targets is None:
            return hidden
        if self.value_head is not None:
            return {"values": self.value_head(hidden).squeeze(-1).float()}  # [b, s]
        if self.logprob_temperature != 1.0:
            # (h / T) W^T = (h W^T) / T: the tempered logits, still never materialised whole
            hidden = hidden / self.logprob_temperature
            if kl_reference is not None:
                kl_reference = (kl_reference[0] / self.logprob_temperature, kl_reference[1])
        return token_log_probs(
            hidden,
            self.output_weight(),
            targets,
            self.state.tp_group,
            self.cfg.vocab_size,
            self.outputs,
            self.logprob_chunk_size,
            extra_index,
            extra_targets,
            kl_reference,
        )

    @torch.no_grad()
    def _decode_step(
        self, tokens: torch.Tensor, layout: SequenceLayout | None, cache: KVCache
    ) -> torch.Tensor:
        """Run ``tokens`` through the layers with their caches; next-token logits per row.

        Args:
            tokens: ``[b, s]`` int64 new tokens (a prompt, or the last sampled token ``[b, 1]``).
            layout: ``position_ids [b, s]`` of the new tokens and ``segment_ids`` (0 = padding,
                any other value = a real token; one sequence per row, no packing); ``None``:
                every token is real and positions continue from ``cache.next_positions``.
            cache: the batch's cache; this step fills its next ``s`` slots.

        Returns:
            ``[b, vocab_size]`` logits (gathered across TP; fp32, or the parameter dtype when
            wider) at each row's last real token of this step (column ``s - 1`` for a row with
            none). Eval-mode use only: embedding and attention dropout are not applied.
        """
        b, s = tokens.shape
        if layout is None:
            step = torch.arange(s, device=tokens.device)
            layout = SequenceLayout(cache.next_positions.unsqueeze(1) + step)  # [b, s]
        if layout.segment_ids is None:
            valid = torch.ones(b, s, dtype=torch.bool, device=tokens.device)
        else:
            valid = layout.segment_ids != 0
        cache.begin_step(layout.position_ids, valid)
        x = self.embedding(tokens)  # [b, s, h]
        for i, layer in enumerate(self.layers):
            x = layer(x, layout, kv_cache=cache.layer(i))
        cache.end_step()
        last = torch.where(valid, torch.arange(s, device=tokens.device), -1).amax(dim=1)  # [b]
        last = torch.where(last < 0, s - 1, last)
        hidden = self.final_norm(x[torch.arange(b, device=x.device), last])  # [b, s, h] -> [b, h]
        logits = self.logits(hidden)  # [b, vocab_size]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full ``[b, s, vocab_size]`` logits (gathered across TP): generation and tests only."""
        local = hidden @ self.output_weight().t()  # [b, s, v/p]
        full = gather_from_tensor_parallel_region(local, self.state.tp_group)  # [b, s, v]
        return full[..., : self.cfg.vocab_size]

    def stages(self) -> list[nn.Module]:
        """Embedding, layers and final norm in order: the unit a pipeline partitions."""
        return [self.embedding, *self.layers, self.final_norm]


def build_loaded(
    cfg: Any, state: ParallelState, state_dict: dict[str, torch.Tensor], **kwargs: Any
) -> GPTModel:
    """A :class:`GPTModel` that holds ``state_dict``'s tensors themselves.

    Built on the meta device (no random initialisation, no memory) and filled by assignment, so
    loading a checkpoint never holds two copies of the weights (a randomly initialised model and
    the loaded one); each tensor takes the dtype the model gives it (as a copying load would), and
    the non-persistent buffers (rotary tables) are rebuilt on the weights' device. ``kwargs`` go
    to :class:`GPTModel`.

    Raises:
        RuntimeError: ``state_dict`` does not hold exactly the model's weights (``strict``).
    """
    with torch.device("meta"):
        model = GPTModel(cfg, state, **kwargs)
    # the model's own dtypes, as a copying load would give (no copy where they already agree)
    dtypes = {k: t.dtype for k, t in model.state_dict().items()}
    state_dict = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in state_dict.items()}
    # why: assignment makes new Parameter objects; the TP attributes the layers set on theirs
    # (tensor_model_parallel, partition_dim, ...: read by the grad norm and DeepSpeed) must follow
    attributes = {n: dict(vars(p)) for n, p in model.named_parameters()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    for name, param in model.named_parameters():
        for key, value in attributes[name].items():
            setattr(param, key, value)
    device = next(iter(state_dict.values())).device
    for module in model.modules():
        if hasattr(module, "rebuild_buffers"):
            module.rebuild_buffers(device)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"build_loaded: {left[:3]} not in the state dict")
    return model
