"""Memory and throughput model of a run, per rank, and the parallel grids that fit a cluster.

Everything here is arithmetic on the config (no torch, no devices); ``tools/plan.py`` prints it and
``tools/bench/plan_vs_measured.py`` checks it against measured memory.

**Parameters** are counted from the architecture exactly as ``megatron/model`` builds it (fused
``linear_qkv`` of ``(n + 2 nk) hn`` columns, SwiGLU's ``[gate; up]`` ``fc1``, biases and norms as
configured, the vocabulary padded to ``padded_vocab_size``): column- and row-parallel weights are
split over TP, norms and row-parallel biases are replicated. With PP the largest stage counts
(stage 0 holds the embedding, the last stage the final norm and ``lm_head``).

**Model states** (bytes per parameter ``Ψ`` of the rank; ZeRO, Rajbhandari et al. 2020,
arXiv:1910.02054, §3, with DeepSpeed 0.19's buffers): weights ``d Ψ`` (``d`` = 2 for bf16/fp16,
4 for fp32; ZeRO-3 divides by the data-parallel size ``N_d``), gradients ``d Ψ`` at ZeRO-0/1
(at ZeRO-2/3 each reduction bucket goes straight into the fp32 gradient partition below), and
the optimizer's partition (``/ N_d``; not partitioned only for fp32 without ZeRO,
where torch's AdamW steps the weights themselves): Adam's two fp32 moments ``8 Ψ`` plus, whenever
DeepSpeed keeps its own fp32 copy (any ZeRO stage, or 16-bit weights), fp32 master weights
``4 Ψ`` and fp32 gradients ``4 Ψ``. So fp32 ZeRO-0 is ``16 Ψ``; 16-bit ZeRO-1 at ``N_d = 1`` is
``20 Ψ``, and ``4 Ψ + 16 Ψ / N_d`` with many ranks (the paper's ``2 + 2 + K/N_d`` with
``K = 12``, plus the fp32 gradient partition DeepSpeed accumulates into). The optimizer step
adds a transient ``4 Ψ / N_d`` (torch AdamW's ``sqrt(v) + eps``), measured on CPU; the peak is
the model states plus the largest of three phases that do not overlap: forward/backward
(activations and log-prob buffers), the rollout's KV cache, the optimizer step. DeepSpeed's ZeRO
buffers (:func:`zero_buffers`) come on top: ~3.7 GiB per GPU at ZeRO-1 with our 500 M-element
buckets, whatever the model's size.

**Activations** are the tensors each layer saves for backward, counted from our layer's own code
(``megatron/model/transformer.py``; torch SDPA or flash attention, which keep no score matrix):
per token and layer, with ``d`` the activation bytes, ``p`` the TP size, ``h`` hidden, ``f`` ffn,
``n``/``nk`` heads/kv heads, ``hn`` head dim:

* each norm: RMSNorm keeps its fp32 input ``4h`` (the input itself in fp32), ``4`` for
  ``rsqrt`` and the normalised ``d h``; LayerNorm keeps its input ``d h`` and two statistics;
* the input of ``linear_qkv`` and of ``linear_fc1``: ``d h`` each;
* attention: the ``linear_qkv`` output ``d (n + 2nk) hn / p`` (``v`` is a view of it), the rotated
  ``q`` and ``k`` ``d (n + nk) hn / p``, the context ``d n hn / p`` (also ``linear_proj``'s
  input) and the log-sum-exp ``4 n / p``;
* MLP: SwiGLU keeps ``fc1``'s output ``2 d f / p``, ``silu(gate)`` and ``fc2``'s input
  ``d f / p`` each; GeLU ``fc1``'s output and ``fc2``'s input, ``d f / p`` each;
* hidden dropout masks (after attention and after the MLP; one more after the embedding) of
  ``h`` elements, 1 byte each on CUDA (``native_dropout``'s bool mask; ``d`` bytes on CPU);
  attention dropout is not modelled (flash-attn regenerates its mask); sequence parallelism
  divides the ``h`` terms by ``p``.

Outside the layers: the token ids (8 bytes), rotary ``cos``/``sin`` (``2 d r``, ``r`` rotary
dims; once per micro-batch), the final norm, the output layer's input ``d h`` and its fp32
``log Z``. This matches the
saved-tensor bytes measured on the model exactly (``tests/test_planner.py``). With
activation checkpointing (``model.activation_checkpointing``) a layer keeps only its input ``d h``
and one layer's activations exist again during its recomputation. A pipeline stage holds the
activations of ``min(pp, micro-batches)`` micro-batches in flight (1F1B; Narayanan et al. 2021,
arXiv:2104.04473). A reference model is a frozen copy of the rank's weights (``d Ψ``); with PP the
reference comes from a precomputed cache (``reference.source: cache``), which holds no GPU
memory. The chunked log-prob kernel (``megatron/parallel/cross_entropy.py``) about three fp32 ``[chunk, v/p]`` temporaries of
256 MiB each at most.

**Throughput**: model FLOPs per trained token ``6 N + 12 L n hn s`` (Chowdhery et al. 2022,
arXiv:2204.02311, App. B: ``N`` the parameters outside the embedding, the attention term at full
``s``); a reference model adds its forward, ``2 N + 4 L n hn s``. Tokens/s at an MFU: ``MFU x
peak x GPUs / FLOPs per token``. Ranking grids by speed, full recomputation costs one more forward
(``(8 N ...) / (6 N ...)``) and a pipeline's bubble ``(pp - 1) / (m + pp - 1)`` of the step (``m``
micro-batches); communication is not modelled: among equally fast grids, ZeRO-3 (1.5x the data
moved of stages 0-2, ZeRO paper §7) ranks last, then more TP x PP.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from megatron.config.deepspeed import BUCKET_ELEMENTS

GiB = float(2**30)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LOGPROB_CHUNK_BYTES = 256 * 2**20
"""The chunked log-prob kernel's chunk of fp32 logits (``cross_entropy._CHUNK_BYTES``)."""
LOGPROB_TEMPORARIES = 3
"""fp32 ``[chunk, v/p]`` tensors alive at once in a chunk (logits, their exp, the gradient)."""
MAX_LIVE_ELEMENTS = 1_000_000_000
"""DeepSpeed's ``stage3_max_live_parameters`` default: ZeRO-3 keeps up to this many gathered
weights resident before releasing them."""


@dataclass(frozen=True)
class Grid:
    """A parallel layout and batch shape of one rank."""

    tp: int
    pp: int
    dp: int
    zero: int
    micro_batch: int
    checkpointing: bool
    sequence_parallel: bool = False

    def describe(self) -> str:
        ckpt = "ckpt" if self.checkpointing else "-"
        return f"TP{self.tp} PP{self.pp} DP{self.dp} ZeRO-{self.zero} mb{self.micro_batch} {ckpt}"


@dataclass(frozen=True)
class Workload:
    """What a step processes, from the run config (see :func:`workload`)."""

    seq_length: int
    rows_per_sample: int
    """Sequences of ``seq_length`` per row at most (2 for padded pairs, else 1)."""
    global_batch: int
    precision: str
    reference_model: bool
    rollout_rows: int = 0
    """Rows of the rollout's KV cache per rank (online RL: prompts x G per data-parallel rank)."""
    uses_logprobs: bool = True
    dropout_mask_bytes: int = 1
    """Bytes per element of a kept dropout mask: CUDA's ``native_dropout`` keeps a bool mask; on
    CPU torch keeps it in the activations' dtype (measured)."""


@dataclass(frozen=True)
class Memory:
    """Bytes per rank, by part."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logprob_buffers: float
    reference: float
    kv_cache: float
    optimizer_step: float = 0.0
    """The optimizer step's fp32 temporary (AdamW's ``sqrt(v) + eps`` over its partition)."""
    zero_buffers: float = 0.0
    """DeepSpeed's ZeRO communication buffers (gradient buckets; ZeRO-3's gathered weights)."""

    @property
    def total(self) -> float:
        """The peak: the model states plus the largest of the phases that do not overlap —
        forward/backward (activations, log-prob buffers), the rollout (KV cache), the
        optimizer step (its temporary)."""
        states = self.weights + self.gradients + self.optimizer + self.reference + self.zero_buffers
        phases = (self.activations + self.logprob_buffers, self.kv_cache, self.optimizer_step)
        return states + max(phases)

    def rows(self) -> list[tuple[str, float]]:
        """``(part, bytes)`` in print order, the total last."""
        return [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("ZeRO buffers", self.zero_buffers),
            ("activations", self.activations),
            ("log-prob buffers", self.logprob_buffers),
            ("reference model", self.reference),
            ("rollout KV cache", self.kv_cache),
            ("optimizer step", self.optimizer_step),
            ("peak", self.total),
        ]


# ---- parameters ---------------------------------------------------------------------------------
def _norm_params(m: Any) -> int:
    return m.hidden_size * (2 if m.norm == "layernorm" and m.norm_bias else 1)


def layer_params(m: Any, tp: int = 1) -> int:
    """Parameters of one decoder layer on one TP rank."""
    h, hn, f = m.hidden_size, m.kv_channels, m.ffn_hidden_size
    qkv = (m.num_attention_heads + 2 * m.num_kv_heads) * hn
    attn = h * qkv // tp + (qkv // tp if m.qkv_bias else 0)
    attn += m.num_attention_heads * hn * h // tp + (h if m.proj_bias else 0)
    fc1 = 2 * f if m.activation == "swiglu" else f
    mlp = h * fc1 // tp + (fc1 // tp if m.mlp_bias else 0) + f * h // tp + (h if m.mlp_bias else 0)
    return attn + mlp + 2 * _norm_params(m)


def stage_params(m: Any, tp: int = 1, pp: int = 1) -> list[int]:
    """Parameters of each pipeline stage on one TP rank (layers split evenly)."""
    embed = m.padded_vocab_size * m.hidden_size // tp
    if m.head == "value":
        head = m.hidden_size
    elif m.tie_word_embeddings:
        head = embed if pp > 1 else 0  # the last stage keeps its own tied copy
    else:
        head = embed
    per_stage = m.num_layers // pp
    stages = [per_stage * layer_params(m, tp) for _ in range(pp)]
    stages[0] += embed
    stages[-1] += head + _norm_params(m)
    return stages


def total_params(m: Any) -> int:
    """All parameters of the unsharded model."""
    return stage_params(m)[0]


def non_embedding_params(m: Any) -> int:
    """Parameters outside the embedding and output projection (``N`` of the FLOPs model)."""
    return m.num_layers * layer_params(m) + _norm_params(m)


# ---- activations --------------------------------------------------------------------------------
def _norm_bytes(m: Any, d: int, h: float) -> float:
    """What one norm keeps, plus its output when that is a new tensor kept by the next op."""
    if m.norm == "rmsnorm":  # fp32 input (the input itself in fp32), rsqrt, normalised
        return (4 * h if d != 4 else d * h) + 4 + d * h
    return d * h + 2 * d  # LayerNorm: input, mean, rstd


def activation_bytes_per_token(
    m: Any, d: int, tp: int = 1, sequence_parallel: bool = False, mask_bytes: int = 1
) -> float:
    """Bytes one layer saves for backward per token (see the module docstring)."""
    h = m.hidden_size / (tp if sequence_parallel else 1)
    hn, n, nk = m.kv_channels, m.num_attention_heads / tp, m.num_kv_heads / tp
    f = m.ffn_hidden_size / tp
    norms = 2 * _norm_bytes(m, d, h)
    if m.parallel_residual and (m.norm == "layernorm" or d == 4):
        norms -= d * h  # both norms keep x itself: one tensor
    linear_inputs = 2 * d * h  # linear_qkv's and linear_fc1's (the norms' outputs)
    attn = d * (n + 2 * nk) * hn + d * (n + nk) * hn + d * n * hn + 4 * n
    mlp = (4 if m.activation == "swiglu" else 2) * d * f
    dropout = 2 * mask_bytes * h if m.hidden_dropout > 0 else 0  # after attention and the MLP
    return norms + linear_inputs + attn + mlp + dropout


def outside_layers_bytes_per_token(m: Any, d: int, mask_bytes: int = 1, tp: int = 1) -> float:
    """Bytes kept per token outside the layers: token ids (int64), the embedding's dropout mask,
    rotary ``cos``/``sin``, the final norm, the output layer's input and its fp32 ``log Z`` (with
    TP also each target's index in this rank's vocabulary shard, int64, and whether it is there)."""
    rotary = 2 * d * _rotary_dims(m)
    head = _norm_bytes(m, d, m.hidden_size) + d * m.hidden_size + 4 + (9 if tp > 1 else 0)
    dropout = mask_bytes * m.hidden_size if m.hidden_dropout > 0 else 0
    return 8 + dropout + rotary + head


def _rotary_dims(m: Any) -> int:
    return int(m.kv_channels * m.rotary_pct)


def activations(m: Any, work: Workload, grid: Grid, accumulation: int) -> float:
    """Activation bytes of one rank's busiest pipeline stage at its peak."""
    d = DTYPE_BYTES[work.precision]
    tokens = grid.micro_batch * work.rows_per_sample * work.seq_length
    layers = m.num_layers // grid.pp
    mask = work.dropout_mask_bytes
    per_layer = activation_bytes_per_token(m, d, grid.tp, grid.sequence_parallel, mask) * tokens
    in_flight = min(grid.pp, accumulation) if grid.pp > 1 else 1
    if grid.checkpointing:
        h = m.hidden_size / (grid.tp if grid.sequence_parallel else 1)
        stored = layers * d * h * tokens * in_flight + per_layer
    else:
        stored = layers * per_layer * in_flight
    return stored + outside_layers_bytes_per_token(m, d, mask, grid.tp) * tokens


def logprob_buffers(m: Any, work: Workload, grid: Grid) -> float:
    """The chunked log-prob kernel's fp32 temporaries."""
    if not work.uses_logprobs or m.head == "value":
        return 0.0
    tokens = grid.micro_batch * work.rows_per_sample * work.seq_length
    one = min(LOGPROB_CHUNK_BYTES, 4 * tokens * m.padded_vocab_size / grid.tp)
    return LOGPROB_TEMPORARIES * one


# ---- the whole rank -----------------------------------------------------------------------------
def _largest_tensor(m: Any, tp: int) -> int:
    fc1 = (2 if m.activation == "swiglu" else 1) * m.ffn_hidden_size
    qkv = (m.num_attention_heads + 2 * m.num_kv_heads) * m.kv_channels
    return max(m.padded_vocab_size * m.hidden_size, fc1 * m.hidden_size, qkv * m.hidden_size) // tp


def zero_buffers(m: Any, d: int, psi: int, grid: Grid, first_touch: bool = False) -> float:
    """DeepSpeed 0.19's ZeRO buffers (``runtime/zero/stage_1_and_2.py`` ``setup_buckets``,
    ``stage3.py``): ZeRO-1/2 with ``contiguous_gradients`` and ``overlap_comm`` (ours,
    ``megatron/config/deepspeed.py``) allocate two reduction buffers of ``reduce_bucket_size``
    elements each step — fp32 at ZeRO-1 (it stages the fp32 accumulator), the weights' dtype at
    ZeRO-2; ZeRO-3 one such buffer plus the gathered weights it keeps resident
    (``stage3_max_live_parameters``, 1e9 elements, or the whole rank's model if smaller).

    Args:
        first_touch: count only the pages written (a CPU's resident memory: ``torch.empty``
            pages count once touched) instead of what a GPU allocates.
    """
    bucket = BUCKET_ELEMENTS
    if grid.zero in (1, 2):
        nbytes = 4 if grid.zero == 1 else d
        elements = min(psi, 2 * bucket) if first_touch else 2 * bucket
        return elements * nbytes
    if grid.zero == 3:
        staging = min(psi, bucket) if first_touch else bucket  # unreduced: the full gradients
        gathered = min(psi, max(MAX_LIVE_ELEMENTS, _largest_tensor(m, grid.tp)))
        return (staging + gathered) * d
    return 0.0


def memory(m: Any, work: Workload, grid: Grid, first_touch: bool = False) -> Memory:
    """Bytes per rank of the busiest pipeline stage, by part (``first_touch``: see
    :func:`zero_buffers`)."""
    d = DTYPE_BYTES[work.precision]
    psi = max(stage_params(m, grid.tp, grid.pp))
    sixteen = d == 2
    part = grid.dp if (grid.zero >= 1 or sixteen) else 1
    fp32_copy = grid.zero >= 1 or sixteen
    weights = d * psi / (grid.dp if grid.zero == 3 else 1)
    # ZeRO-2/3 reduce each bucket into the fp32 gradient partition (counted with the optimizer):
    # no gradient of the weights' dtype outlives its bucket
    gradients = d * psi if grid.zero <= 1 else 0.0
    optimizer = (8 + (8 if fp32_copy else 0)) * psi / part
    per_rank_rows = max(work.global_batch // grid.dp, 1)
    accumulation = max(per_rank_rows // grid.micro_batch, 1)
    kv = 0.0
    if work.rollout_rows:
        kv = (
            2 * m.num_layers * work.rollout_rows * work.seq_length
            * m.num_kv_heads / grid.tp * m.kv_channels * d
        )  # fmt: skip
    return Memory(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations(m, work, grid, accumulation),
        logprob_buffers=logprob_buffers(m, work, grid),
        # with PP the reference comes from a precomputed cache (validate refuses a model)
        reference=d * psi if work.reference_model and grid.pp == 1 else 0.0,
        kv_cache=kv,
        optimizer_step=4 * psi / part,
        zero_buffers=zero_buffers(m, d, psi, grid, first_touch),
    )


def flops_per_token(m: Any, seq: int, reference_model: bool = False) -> float:
    """Model FLOPs per trained token (forward + backward, plus a reference forward)."""
    n = non_embedding_params(m) + m.padded_vocab_size * m.hidden_size
    attn = m.num_layers * m.num_attention_heads * m.kv_channels * seq
    train = 6 * n + 12 * attn
    return train + (2 * n + 4 * attn if reference_model else 0)


def tokens_per_s(m: Any, work: Workload, gpus: int, mfu: float, peak_tflops: float) -> float:
    """Trained tokens per second of the whole job at ``mfu`` of ``peak_tflops`` per GPU."""
    return (
        mfu * peak_tflops * 1e12 * gpus / flops_per_token(m, work.seq_length, work.reference_model)
    )


def grid_speed(m: Any, work: Workload, grid: Grid) -> float:
    """Relative speed of a grid (1 = no recomputation, no bubble; see the module docstring)."""
    per_rank_rows = max(work.global_batch // grid.dp, 1)
    micro_batches = max(per_rank_rows // grid.micro_batch, 1)
    bubble = (grid.pp - 1) / (micro_batches + grid.pp - 1)
    speed = 1.0 - bubble
    if grid.checkpointing:
        n = non_embedding_params(m) + m.padded_vocab_size * m.hidden_size
        attn = m.num_layers * m.num_attention_heads * m.kv_channels * work.seq_length
        speed *= (6 * n + 12 * attn) / (8 * n + 16 * attn)
    return speed


@dataclass(frozen=True)
class Fit:
    """A grid that fits, its memory and its relative speed."""

    grid: Grid
    memory: Memory
    speed: float


def _divisors(n: int, limit: int) -> list[int]:
    return [k for k in range(1, min(n, limit) + 1) if n % k == 0]


def search(
    m: Any,
    work: Workload,
    gpus: int,
    gpu_mem_bytes: float,
    *,
    gpus_per_node: int = 8,
    pipeline_ok: bool = True,
    micro_batches: tuple[int, ...] = (1, 2, 4, 8, 16),
) -> list[Fit]:
    """Every grid of ``gpus`` GPUs whose busiest rank fits ``gpu_mem_bytes``, best first.

    TP stays within a node and divides the heads and kv heads; PP divides the layers (ZeRO <= 1
    with PP, as DeepSpeed requires; 16-bit precision needs ZeRO >= 1, as the config's validation
    does); the micro-batch divides each data-parallel rank's share of
    the global batch. Order: relative speed (:func:`grid_speed`), then fewer model-parallel ranks,
    then less memory.
    """
    fits: list[Fit] = []
    tps = [t for t in _divisors(gpus, gpus_per_node)
           if m.num_attention_heads % t == 0 and m.num_kv_heads % t == 0]  # fmt: skip
    for tp, pp in itertools.product(tps, _divisors(m.num_layers, gpus)):
        if gpus % (tp * pp) or (pp > 1 and not pipeline_ok):
            continue
        dp = gpus // (tp * pp)
        if work.global_batch % dp:
            continue
        share = work.global_batch // dp
        for zero, mb, ckpt in itertools.product((0, 1, 2, 3), micro_batches, (False, True)):
            # ZeRO <= 1 with PP (DeepSpeed); 16-bit needs ZeRO >= 1 (fp32 gradients, validate)
            if (pp > 1 and zero > 1) or (work.precision != "fp32" and zero == 0) or share % mb:
                continue
            grid = Grid(tp, pp, dp, zero, mb, ckpt)
            mem = memory(m, work, grid)
            if mem.total <= gpu_mem_bytes:
                fits.append(Fit(grid, mem, grid_speed(m, work, grid)))
    fits.sort(key=lambda f: (-round(f.speed, 6), f.grid.zero == 3, f.grid.tp * f.grid.pp,
                             f.memory.total))  # fmt: skip
    return _best_per_layout(fits)


def _best_per_layout(fits: list[Fit]) -> list[Fit]:
    """One row per (TP, PP, ZeRO, checkpointing): its largest micro-batch that fits."""
    best: dict[tuple, Fit] = {}
    for f in fits:
        key = (f.grid.tp, f.grid.pp, f.grid.zero, f.grid.checkpointing)
        if key not in best or f.grid.micro_batch > best[key].grid.micro_batch:
            best[key] = f
    order = {id(f): i for i, f in enumerate(fits)}
    return sorted(best.values(), key=lambda f: order[id(f)])


def workload(cfg: Any, batch_kind: str, reference_model: bool, dp: int) -> Workload:
    """The :class:`Workload` of a resolved run config.

    Args:
        cfg: the run config.
        batch_kind: the objective's ``batch_kind``.
        reference_model: whether a reference model sits beside the policy.
        dp: the data-parallel size (for the rollout's rows per rank).
    """
    # a padded pair row holds chosen and rejected of up to seq_length each; packed and
    # prefix-shared rows hold at most seq_length tokens
    rows = 2 if batch_kind == "pair" and cfg.data.layout == "padded" else 1
    rollout_rows = 0
    if batch_kind == "prompt":
        g = getattr(cfg.objective.params, "num_generations", 1)
        prompts = -(-cfg.rollout.prompts_per_step // dp)
        rollout_rows = cfg.rollout.generation_batch_size or prompts * g
    return Workload(
        seq_length=cfg.data.seq_length,
        rows_per_sample=rows,
        global_batch=cfg.training.global_batch_size,
        precision=cfg.training.precision,
        reference_model=reference_model,
        rollout_rows=rollout_rows,
        uses_logprobs=cfg.model.head != "value",
    )
