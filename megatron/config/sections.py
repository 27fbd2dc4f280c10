"""Typed sections of the run configuration.

Each section is a frozen ``@dataclass(kw_only=True)``; every field carries a docstring right under
it (rendered into ``configs/README.md`` by :mod:`megatron.config.docs`). Section-local checks run in
``__post_init__`` and raise :class:`SectionError` listing every bad field at once; cross-section
rules live in :mod:`megatron.config.validate`.

Fields whose metadata holds ``"derived"`` are computed by :func:`megatron.config.load_config` and
must not be set in YAML. When a section is built directly in code (tests), ``__post_init__`` fills
the derivations it can make alone (e.g. ``model.kv_channels``; ``model.padded_vocab_size`` then
assumes ``parallel.tensor`` = 1).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron.config.online import RewardSpec, RolloutConfig
from megatron.errors import FieldChecks
from megatron.objectives.registry import get_objective, objective_names


def derived(rule: str) -> Any:
    """A field computed at load time from ``rule``; setting it in YAML is an error."""
    return field(default=None, metadata={"derived": rule})


def is_derived(f: dataclasses.Field) -> bool:
    """Whether a dataclass field is marked derived."""
    return "derived" in f.metadata


def _set(obj: Any, name: str, value: Any) -> None:
    # Sections are frozen; derivations made in __post_init__ go through object.__setattr__.
    object.__setattr__(obj, name, value)


def default_ffn_hidden_size(hidden_size: int, activation: str) -> int:
    """Default MLP width: 4h for GeLU; Llama's rule for SwiGLU.

    SwiGLU has three matrices instead of two, so Llama keeps the parameter count of a 4h GeLU MLP
    with ``int(8h/3)`` rounded up to a multiple of 256 (e.g. 4096 -> 11008).
    """
    if activation == "swiglu":
        return 256 * math.ceil(int(8 * hidden_size / 3) / 256)
    return 4 * hidden_size


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``divisible_by * tensor`` (Megatron's rule)."""
    multiple = divisible_by * tensor
    return multiple * math.ceil(vocab_size / multiple)


def config_to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config or section, derived values included.

    The objective comes back flat: ``{"name": "lm", "z_loss": 0.0}``.
    """
    if isinstance(cfg, ObjectiveSection):
        return {"name": cfg.name, **config_to_dict(cfg.params)}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    return cfg


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Rotary frequency scaling for context extension (``model.rope_scaling``)."""

    type: Literal["llama3", "linear"]
    """``llama3``: Llama 3.1's wavelength-dependent scaling; ``linear``: positions divided by ``factor``."""
    factor: float
    """Context extension factor (8.0 for Llama 3.1)."""
    low_freq_factor: float = 1.0
    """``llama3`` only: wavelengths above ``original_max_position_embeddings / low_freq_factor`` are scaled fully."""
    high_freq_factor: float = 4.0
    """``llama3`` only: wavelengths below ``original_max_position_embeddings / high_freq_factor`` are kept."""
    original_max_position_embeddings: int = 8192
    """``llama3`` only: the context length the model was pre-trained with."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        checks.positive("factor")
        checks.positive("low_freq_factor")
        checks.positive("high_freq_factor")
        checks.at_least("original_max_position_embeddings", 1)
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            checks.fail(
                "high_freq_factor",
                f"({self.high_freq_factor}) must be > low_freq_factor ({self.low_freq_factor})",
            )
        checks.done()


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of the GPT model (the only section a model preset in ``configs/models`` sets)."""

    num_layers: int
    """Number of transformer layers."""
    hidden_size: int
    """Width of the residual stream (h)."""
    num_attention_heads: int
    """Number of query heads."""
    num_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); default: ``num_attention_heads``."""
    ffn_hidden_size: int | None = None
    """MLP inner width; default: 4h for gelu, int(8h/3) rounded up to a multiple of 256 for swiglu."""
    kv_channels: int | None = derived("hidden_size / num_attention_heads")
    """Width of one attention head (hidden_size / num_attention_heads)."""
    vocab_size: int
    """Vocabulary size of the tokenizer (before padding)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times ``parallel.tensor``."""
    padded_vocab_size: int | None = derived(
        "vocab_size rounded up to a multiple of make_vocab_size_divisible_by x parallel.tensor"
    )
    """Rows of the embedding and output layer (vocab_size rounded up to a multiple of make_vocab_size_divisible_by x parallel.tensor)."""
    max_position_embeddings: int
    """Longest sequence the model supports; ``data.seq_length`` may not exceed it."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation layer."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu"
    """MLP activation: exact GeLU, tanh-approximated GeLU, or SwiGLU (gated SiLU, three matrices)."""
    rotary_pct: float = 1.0
    """Fraction of each head's channels that get rotary embeddings (Pythia: 0.25)."""
    rotary_base: float = 10000.0
    """Rotary base (theta)."""
    rotary_interleaved: bool = False
    """Rotate interleaved channel pairs (GPT-J style) instead of the two halves (GPT-NeoX/Llama style)."""
    rope_scaling: RopeScaling | None = None
    """Rotary frequency scaling for long context; null disables it."""
    parallel_residual: bool = False
    """GPT-NeoX parallel residual: x + attn(ln1(x)) + mlp(ln2(x)) instead of sequential blocks."""
    qkv_bias: bool = False
    """Bias on the fused query/key/value projection."""
    proj_bias: bool = False
    """Bias on the attention output projection."""
    mlp_bias: bool = False
    """Biases on the MLP projections."""
    norm_bias: bool = True
    """Bias of LayerNorm (ignored by RMSNorm, which has none)."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""
    head: Literal["lm", "value"] = "lm"
    """Output head: ``lm`` (next-token log-probs) or ``value`` (a scalar per token from ``value_head``, no lm_head: reward models)."""
    sliding_window: int | None = None
    """Each token attends to at most this many previous tokens (Mistral v0.1: 4096); null: full causal attention."""
    attention_backend: Literal["auto", "sdpa", "flash"] = "auto"
    """Attention kernel: ``auto`` picks flash-attn when installed and usable, else PyTorch SDPA."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    hidden_dropout: float = 0.0
    """Dropout on the outputs of attention and MLP before the residual add."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass to save memory."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        checks.at_least("num_layers", 1)
        checks.at_least("max_position_embeddings", 1)
        hidden_ok = checks.at_least("hidden_size", 1)
        heads_ok = checks.at_least("num_attention_heads", 1)
        vocab_ok = checks.at_least("vocab_size", 1)
        vocab_ok &= checks.at_least("make_vocab_size_divisible_by", 1)
        if self.num_kv_heads is None and heads_ok:
            _set(self, "num_kv_heads", self.num_attention_heads)
        checks.at_least("num_kv_heads", 1)
        if self.ffn_hidden_size is None and hidden_ok:
            _set(
                self, "ffn_hidden_size", default_ffn_hidden_size(self.hidden_size, self.activation)
            )
        checks.at_least("ffn_hidden_size", 1)
        if self.kv_channels is None and heads_ok:
            _set(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        if self.padded_vocab_size is None and vocab_ok:
            padded = padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, 1)
            _set(self, "padded_vocab_size", padded)
        checks.positive("norm_eps")
        checks.fraction("rotary_pct", closed_high=True, open_low=True)
        checks.positive("rotary_base")
        checks.at_least("sliding_window", 1)
        checks.fraction("attention_dropout")
        checks.fraction("hidden_dropout")
        checks.positive("init_method_std")
        checks.done()


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the model is split over ranks: world = tensor x pipeline x data."""

    tensor: int = 1
    """Tensor-parallel size (Megatron-style sharding of every layer)."""
    pipeline: int = 1
    """Pipeline-parallel size (DeepSpeed pipeline engine)."""
    data: int | None = derived("world size / (tensor x pipeline)")
    """Data-parallel size: world size / (tensor x pipeline); the world size is the launched rank count, or launcher.num_nodes x launcher.nproc_per_node when that is set, else tensor x pipeline."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage (sharding of optimizer state, gradients, parameters over data-parallel ranks)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (reserved; not implemented yet)."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        checks.at_least("tensor", 1)
        checks.at_least("pipeline", 1)
        if self.data is None:
            _set(self, "data", 1)
        checks.at_least("data", 1)
        if self.sequence_parallel:
            checks.fail("sequence_parallel", "not implemented yet; set it to false")
        checks.done()


@dataclass(frozen=True, kw_only=True)
class DataSource:
    """One dataset of a blend (an entry of ``data.train`` or ``data.valid``)."""

    path: str
    """Prefix of the preprocessed dataset (``PREFIX.bin``/``.idx``/``.meta.json``)."""
    weight: float = 1.0
    """Relative sampling weight within the blend."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        if not self.path:
            checks.fail("path", "must not be empty")
        checks.positive("weight")
        checks.done()


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Datasets and sequence length."""

    train: list[DataSource]
    """Training blend: a list of ``{path, weight}`` (items drawn in proportion to the weights; all of one format and tokenizer)."""
    valid: list[DataSource] | None = None
    """Validation blend; null: no evaluation (or the valid part of ``split``)."""
    test: list[DataSource] | None = None
    """Test blend; null: none (or the test part of ``split``)."""
    split: list[float] | None = None
    """Train/valid/test fractions of every ``train`` dataset's rows, e.g. ``[0.98, 0.02, 0]`` (a seeded split; pairs stay whole); null: use ``valid``/``test``."""
    seq_length: int
    """Tokens per row: the row capacity of the packed and prefix_shared layouts and the longest sequence (prompt + completion; prefix_shared: prompt + chosen + rejected) accepted."""
    layout: Literal["auto", "padded", "packed", "prefix_shared", "prefix_shared_packed"] = "auto"
    """Sequence layout of post-training batches: ``auto`` (default): the fastest exact layout measured, resolved at load (:func:`megatron.data.collators.default_layout`): ``prefix_shared_packed`` for objectives with pair batches and for online RL (every attention backend), else ``padded``; ``padded``: one sequence per row padded to the micro-batch's longest (rounded up to ``pad_to_multiple_of``); ``packed``: several per row packed up to ``seq_length`` (attention within each sequence, computed per sequence rather than over the whole row); ``prefix_shared`` (objectives with pair batches, and online RL): each pair as one span ``[prompt | chosen | rejected]`` storing the prompt once, rejected attending to the prompt but not to chosen (online RL: a prompt with its sampled completions of a micro-batch, each attending to the prompt and itself), one span per row (the whole span must fit ``seq_length``); ``prefix_shared_packed``: the same spans packed several per row like ``packed`` (no padding slots; attention per span). ``text`` data always uses full windows."""
    pad_to_multiple_of: int = 8
    """Round each micro-batch's row length up to a multiple of this (capped at ``seq_length``)."""
    seed: int = 1234
    """Seed of ``split``, of the blend's row draws and of the unpaired (KTO) mismatch rule."""
    tokenizer: str | None = None
    """Tokenizer directory (HF); when set, every dataset must have been built with the same vocabulary (checked at start-up); null: not checked."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        if not self.train:
            checks.fail("train", "must list at least one dataset")
        for key in ("valid", "test"):
            if getattr(self, key) is not None and not getattr(self, key):
                checks.fail(key, "must list at least one dataset, or be null")
        if self.split is not None:
            self._check_split(checks)
        checks.at_least("seq_length", 1)
        checks.at_least("pad_to_multiple_of", 1)
        checks.at_least("num_workers", 0)
        checks.done()

    def _check_split(self, checks: FieldChecks) -> None:
        split = list(self.split or [])
        if not 2 <= len(split) <= 3 or any(f < 0 for f in split):
            checks.fail(
                "split", f"must be 2 or 3 fractions >= 0 (train, valid[, test]), got {split}"
            )
        elif abs(sum(split) - 1.0) > 1e-6:
            checks.fail("split", f"fractions must sum to 1, got {split} (sum {sum(split):g})")
        elif split[0] == 0:
            checks.fail("split", "the train fraction must be > 0")
        for j, key in ((1, "valid"), (2, "test")):
            if j < len(split) and split[j] > 0 and getattr(self, key):
                checks.fail(key, f"give data.{key} or a {key} fraction in data.split, not both")


@dataclass(frozen=True, kw_only=True)
class ObjectiveSection:
    """The training objective: ``name`` plus that objective's own parameters, flat in YAML.

    ``objective: {name: lm, z_loss: 0.1}`` gives ``name="lm"`` and ``params=LMConfig(z_loss=0.1)``.
    """

    name: str = "lm"
    """Registered objective name (see the objective tables below)."""
    params: Any = None
    """Instance of the objective's ``Config`` (its keys sit next to ``name`` in YAML)."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        if self.name not in objective_names():
            checks.fail(
                "name", f"unknown objective {self.name!r}; choices: {', '.join(objective_names())}"
            )
            checks.done()
        config_cls = get_objective(self.name).Config
        if self.params is None:
            _set(self, "params", config_cls())
        elif not isinstance(self.params, config_cls):
            checks.fail(
                "params", f"must be a {config_cls.__name__}, got {type(self.params).__name__}"
            )
        checks.done()


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Optimizer (torch AdamW, built by the trainer and handed to DeepSpeed)."""

    type: Literal["adamw"] = "adamw"
    """Optimizer type."""
    lr: float
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam (beta1, beta2)."""
    eps: float = 1e-8
    """Adam epsilon."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        checks.positive("lr")
        checks.at_least("weight_decay", 0)
        if len(self.betas) != 2:
            checks.fail("betas", f"must hold exactly 2 values (got {len(self.betas)})")
        elif not all(0 <= b < 1 for b in self.betas):
            checks.fail("betas", f"each beta must be in [0, 1) (got {list(self.betas)})")
        checks.positive("eps")
        checks.done()


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up, then constant, linear or cosine decay to ``min_lr``."""

    style: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warm-up."""
    warmup_iters: int | None = None
    """Warm-up iterations (set this or ``warmup_fraction``, not both; neither: no warm-up)."""
    warmup_fraction: float | None = None
    """Warm-up as a fraction of ``training.train_iters``, in [0, 1)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay; at most ``optimizer.lr``."""
    decay_iters: int | None = None
    """Iteration at which the decay reaches ``min_lr``; default: ``training.train_iters`` (resolved at load)."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        checks.at_least("warmup_iters", 0)
        checks.fraction("warmup_fraction")
        if self.warmup_iters is not None and self.warmup_fraction is not None:
            checks.fail("warmup_fraction", "set warmup_iters or warmup_fraction, not both")
        checks.at_least("min_lr", 0)
        checks.at_least("decay_iters", 1)
        checks.done()


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Iterations, batch sizes, precision and evaluation cadence.

    Batch sizes obey global = micro x gradient_accumulation_steps x data-parallel size. Give
    ``global_batch_size`` to have the accumulation steps derived (it must divide exactly), or give
    neither and get ``gradient_accumulation_steps = 1``.
    """

    train_iters: int
    """Optimizer steps to train for."""
    micro_batch_size: int = 1
    """Rows per rank per forward/backward pass (a pairwise row holds chosen and rejected)."""
    gradient_accumulation_steps: int | None = None
    """Micro-batches accumulated per optimizer step; default: derived from global_batch_size, else 1."""
    global_batch_size: int | None = None
    """Rows per optimizer step over all data-parallel ranks; default: micro x accumulation x data parallel size."""
    seed: int = 1234
    """Random seed (initialisation, data order, dropout)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (fp16 uses DeepSpeed's dynamic loss scaling)."""
    gradient_clipping: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    eval_interval: int | None = None
    """Evaluate every this many iterations (needs ``data.valid``); null: no periodic evaluation."""
    eval_iters: int = 10
    """Batches per evaluation."""
    eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run on the live sharded weights at evaluations (e.g. ``[demo_mc, demo_gen]``; lm-eval's names, the repository's ``configs/eval`` tasks, or YAMLs under ``eval_tasks_include_path``); each task's metrics are logged as ``eval/<task>/<metric>`` with the validation metrics. Needs ``eval_interval``, ``parallel.pipeline`` 1, ``parallel.zero_stage`` <= 2 and a ``model.head: lm`` model; the tokenizer is ``data.tokenizer`` (else the training data's)."""
    eval_tasks_interval: int | None = None
    """Run ``eval_tasks`` every this many iterations (a multiple of ``eval_interval``); null: at every evaluation."""
    eval_tasks_include_path: list[str] = field(default_factory=list)
    """Directories of your own lm-eval task YAMLs for ``eval_tasks``."""
    eval_tasks_limit: int | None = None
    """Evaluate only the first this many documents of each task; null: all."""
    eval_tasks_num_fewshot: int | None = None
    """Few-shot examples per prompt; null: each task's default."""
    eval_tasks_batch_size: int = 8
    """Rows per forward of ``eval_tasks`` on each data-parallel replica."""
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    """A step whose loss or gradient norm is NaN/inf on any rank: ``stop`` ends the run (exit status 3) naming the step, the value and the last good checkpoint, before anything is saved for that step; ``skip_step`` drops that optimizer update (weights and optimizer state unchanged; the step still counts and its data is consumed), counts it in the ``skipped_steps`` metric and stops after ``max_consecutive_skips`` in a row. fp16 overflow steps are DeepSpeed's loss scaler's and are not counted."""
    max_consecutive_skips: int = 5
    """With ``on_nonfinite: skip_step``: stop after this many skipped steps in a row."""
    collapse_steps: int = 20
    """Warn when the per-token loss (lm, sft) sits at ln(model.vocab_size), the uniform distribution's, or the gradient norm is exactly 0, for this many steps in a row; 0: never warn."""
    collective_timeout_s: float = 300.0
    """Seconds a collective (all-reduce, broadcast, ...) waits for the other ranks before this rank stops with an error naming the operation; a stalled or dead rank then ends the run instead of hanging it. Raise it when a step or a checkpoint save on one rank takes longer."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        checks.at_least("train_iters", 1)
        checks.at_least("micro_batch_size", 1)
        checks.at_least("gradient_accumulation_steps", 1)
        checks.at_least("global_batch_size", 1)
        checks.at_least("seed", 0)
        checks.at_least("gradient_clipping", 0)
        checks.at_least("eval_interval", 1)
        checks.at_least("eval_iters", 1)
        checks.at_least("eval_tasks_interval", 1)
        checks.at_least("eval_tasks_limit", 1)
        checks.at_least("eval_tasks_num_fewshot", 0)
        checks.at_least("eval_tasks_batch_size", 1)
        checks.at_least("max_consecutive_skips", 1)
        checks.at_least("collapse_steps", 0)
        if self.collective_timeout_s <= 0:
            checks.fail("collective_timeout_s", f"({self.collective_timeout_s:g}) must be > 0")
        checks.done()


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where checkpoints are saved and loaded (each carries the resolved config)."""

    save: str | None = None
    """Directory to save checkpoints to; null: never save."""
    save_interval: int | None = None
    """Save every this many iterations (needs ``save``)."""
    load: str | None = None
    """Checkpoint directory to resume from; null: start from scratch."""
    finetune: bool = False
    """Load only the weights from ``load`` (no optimizer, scheduler or data state) and restart at iteration 0."""
    keep_last: int | None = None
    """Keep only this many most recent checkpoints, plus the newest one whose step had a finite loss and gradient norm (see ``training.on_nonfinite``); null: keep all."""
    allow_changes: bool = False
    """Resume even though the seed, learning rate, batch sizes or data differ from the checkpoint's config (each change is logged at start-up); false: such a resume is refused before launch."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        checks.at_least("save_interval", 1)
        if self.save_interval is not None and self.save is None:
            checks.fail("save_interval", f"({self.save_interval}) needs checkpoint.save to be set")
        if self.finetune and self.load is None:
            checks.fail("finetune", "needs checkpoint.load to be set")
        checks.at_least("keep_last", 1)
        if self.allow_changes and (self.load is None or self.finetune):
            checks.fail(
                "allow_changes", "applies to a resume: needs checkpoint.load and no finetune"
            )
        checks.done()


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Metrics logging (``metrics.jsonl`` in the run directory, optional TensorBoard/W&B)."""

    log_interval: int = 10
    """Log training metrics every this many iterations."""
    dir: str | None = None
    """Run directory for metrics.jsonl; default: ``checkpoint.save`` if set, else ``runs/default`` (resolved at load)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to the run directory."""
    wandb: bool = False
    """Also log to Weights & Biases."""
    wandb_project: str | None = None
    """W&B project name; null: W&B's default."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        checks.at_least("log_interval", 1)
        checks.done()


_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_SLURM_ONLY = (
    "partition", "account", "time", "gpus_per_node", "cpus_per_task", "job_name", "sbatch_lines",
    "setup",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class LauncherConfig:
    """How ``deepy.py`` starts the ranks (and, for Slurm, the batch job that runs ``deepy.py``)."""

    type: Literal["torchrun", "deepspeed", "slurm", "mpirun"] = "torchrun"
    """``torchrun`` (one per node; several nodes: run ``deepy.py`` on each), ``deepspeed`` (its runner, ``hostfile`` for several nodes), ``slurm`` (``srun`` one task per rank inside an allocation; outside one, ``deepy.py --sbatch`` submits a batch job), ``mpirun`` (Open MPI or MPICH/Intel MPI, ``hostfile`` for several nodes)."""
    nproc_per_node: int | None = None
    """Ranks per node; null: the number of visible GPUs, else 1 (inside a Slurm allocation: its tasks per node)."""
    num_nodes: int = 1
    """Number of nodes."""
    node_rank: int = 0
    """Rank of this node (torchrun with ``rdzv_backend: static``)."""
    rdzv_backend: Literal["static", "c10d"] = "static"
    """torchrun's rendezvous: ``static`` (each node's ``node_rank`` fixed, store on ``master_addr``) or ``c10d`` (nodes join at ``master_addr:master_port`` in any order; no ``node_rank``)."""
    rdzv_id: str = "megatron"
    """Job id shared by every node of a ``c10d`` rendezvous."""
    hostfile: str | None = None
    """Hosts and their slots, one per line: ``host slots=N`` (DeepSpeed, Open MPI) or ``host:N`` (MPICH); ``type: deepspeed`` or ``mpirun``."""
    master_addr: str = "127.0.0.1"
    """Address of the rendezvous host (rank 0's node). With ``slurm`` it is the allocation's first node and with ``mpirun`` the hostfile's first host, unless set here."""
    master_port: int = 29500
    """Port of the rendezvous host."""
    extra_args: list[str] = field(default_factory=list)
    """Extra arguments for the launcher program (torchrun, the DeepSpeed runner, ``srun`` or ``mpirun``), e.g. ``[--oversubscribe]``."""
    partition: str | None = None
    """Slurm partition (``#SBATCH --partition``)."""
    account: str | None = None
    """Slurm account (``#SBATCH --account``)."""
    time: str | None = None
    """Slurm time limit: ``minutes``, ``HH:MM:SS`` or ``D-HH:MM:SS`` (``#SBATCH --time``)."""
    gpus_per_node: int | None = None
    """GPUs per node (``#SBATCH --gpus-per-node``, and ``srun --gpus-per-node``)."""
    cpus_per_task: int | None = None
    """CPU cores per rank (``#SBATCH --cpus-per-task``)."""
    job_name: str = "megatron"
    """Slurm job name; also names the batch script ``deepy.py --sbatch`` writes."""
    sbatch_lines: list[str] = field(default_factory=list)
    """Extra ``#SBATCH`` options, e.g. ``["--exclusive", "--mem=0"]``."""
    setup: list[str] = field(default_factory=list)
    """Shell lines the batch script runs before ``deepy.py`` (``module load ...``, ``source .venv/bin/activate``)."""
    signal_before_end_s: int = 120
    """The batch job asks Slurm for SIGUSR1 this many seconds before its time limit (``--signal=B:USR1@N``): the ranks checkpoint and stop."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        checks.at_least("nproc_per_node", 1)
        if checks.at_least("num_nodes", 1) and not 0 <= self.node_rank < self.num_nodes:
            checks.fail(
                "node_rank", f"must be in [0, num_nodes={self.num_nodes}) (got {self.node_rank})"
            )
        if self.hostfile is not None and self.type not in ("deepspeed", "mpirun"):
            checks.fail(
                "hostfile",
                f"is only used by launcher.type 'deepspeed' or 'mpirun' (got {self.type!r})",
            )
        if not 1 <= self.master_port <= 65535:
            checks.fail("master_port", f"must be in [1, 65535] (got {self.master_port})")
        if self.rdzv_backend == "c10d" and self.type != "torchrun":
            checks.fail("rdzv_backend", f"c10d is torchrun's (launcher.type is {self.type!r})")
        if self.rdzv_backend == "c10d" and self.node_rank:
            checks.fail("node_rank", "is decided by the c10d rendezvous: leave it out")
        if self.type != "slurm":
            for name in _SLURM_ONLY:
                default = LauncherConfig.__dataclass_fields__[name]
                value = getattr(self, name)
                if value not in (None, [], default.default):
                    checks.fail(name, f"is only used by launcher.type 'slurm' (got {self.type!r})")
        if self.time is not None and not _SLURM_TIME.match(self.time):
            checks.fail(
                "time", f"{self.time!r} is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)"
            )
        checks.at_least("gpus_per_node", 0)
        checks.at_least("cpus_per_task", 1)
        checks.at_least("signal_before_end_s", 0)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.job_name):
            checks.fail("job_name", f"{self.job_name!r}: use letters, digits, '_', '.', '-'")
        checks.done()


@dataclass(frozen=True, kw_only=True)
class ReferenceConfig:
    """Where reference log-probabilities come from, for objectives that compare with a reference."""

    source: Literal["auto", "model", "cache", "none"] = "auto"
    """``model``: a frozen copy of the policy's architecture beside it (same TP layout, no gradients, no optimizer state); ``cache``: per-sequence log-probs precomputed by ``tools/precompute_reference.py``; ``none``: no reference (reference-free objectives); ``auto``: ``model`` when the objective needs a reference, else ``none``."""
    load: str | None = None
    """Native checkpoint of the reference model (a directory with ``latest`` or an ``iter_*`` directory). null: the policy's *initial* weights — ``checkpoint.load`` of a ``finetune`` start, or the seeded initialisation — never a resumed policy checkpoint."""
    cache: str | None = None
    """Directory of a reference cache (``source: cache``), written by ``tools/precompute_reference.py``; a cache computed for other weights, data or objective settings is refused."""

    def __post_init__(self) -> None:
        checks = FieldChecks(self)
        if self.source == "cache" and self.cache is None:
            checks.fail("cache", "must be set when reference.source is 'cache'")
        if self.cache is not None and self.source not in ("cache", "auto"):
            checks.fail(
                "cache", f"is only read with reference.source 'cache' (got {self.source!r})"
            )
        checks.done()


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The whole run: one field per YAML section."""

    model: ModelConfig
    """Model architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    data: DataConfig
    """Datasets."""
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    """Training objective."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """Reference log-probabilities (DPO-style objectives)."""
    optimizer: OptimizerConfig
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    training: TrainingConfig
    """Training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    """Launcher."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Online RL's rollouts (read by objectives with ``prompt`` batches)."""
    rewards: list[RewardSpec] = field(default_factory=list)
    """Online RL's rewards: a list of reward functions and reward models."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "objective": ObjectiveSection,
    "reference": ReferenceConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "launcher": LauncherConfig,
    "rollout": RolloutConfig,
    "rewards": RewardSpec,
}
"""Section name -> dataclass, in ``RunConfig`` field order (for a list section, its entries')."""
LIST_SECTIONS = frozenset({"rewards"})
"""Sections that are a list of entries rather than a mapping."""
