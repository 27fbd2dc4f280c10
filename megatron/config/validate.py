"""Cross-section rules of the run configuration.

Section-local checks live in each section's ``__post_init__``; this module holds the rules that
relate several sections (and the objective's own constraints). :func:`validate_config` runs inside
:func:`megatron.config.load_config`, before any rank starts. Messages name fields and values:
``model.num_attention_heads (6) must be divisible by parallel.tensor (4)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from megatron.objectives.registry import get_objective

if TYPE_CHECKING:
    from megatron.config.sections import RunConfig


def _attention(cfg: RunConfig) -> list[str]:
    model, tp = cfg.model, cfg.parallel.tensor
    heads, kv_heads = model.num_attention_heads, model.num_kv_heads
    out = []
    if heads % tp:
        out.append(
            f"model.num_attention_heads ({heads}) must be divisible by parallel.tensor ({tp})"
        )
    if kv_heads is not None and kv_heads % tp:
        out.append(f"model.num_kv_heads ({kv_heads}) must be divisible by parallel.tensor ({tp})")
    if kv_heads is not None and heads % kv_heads:
        out.append(
            f"model.num_attention_heads ({heads}) must be divisible by model.num_kv_heads ({kv_heads})"
        )
    if model.hidden_size % heads:
        out.append(
            f"model.hidden_size ({model.hidden_size}) must be divisible by "
            f"model.num_attention_heads ({heads})"
        )
    if model.ffn_hidden_size is not None and model.ffn_hidden_size % tp:
        out.append(
            f"model.ffn_hidden_size ({model.ffn_hidden_size}) must be divisible by parallel.tensor ({tp})"
        )
    return out


def _positions(cfg: RunConfig) -> list[str]:
    model, out = cfg.model, []
    if model.kv_channels is not None:
        rotary = model.rotary_pct * model.kv_channels
        if not (
            math.isclose(rotary, round(rotary)) and round(rotary) % 2 == 0 and round(rotary) > 0
        ):
            out.append(
                f"model.rotary_pct ({model.rotary_pct}) x model.kv_channels ({model.kv_channels}) "
                f"= {rotary:g} rotary channels must be a positive even whole number"
            )
    if cfg.data.seq_length > model.max_position_embeddings:
        out.append(
            f"data.seq_length ({cfg.data.seq_length}) must be <= "
            f"model.max_position_embeddings ({model.max_position_embeddings})"
        )
    scaling = model.rope_scaling
    if scaling is not None and scaling.type == "llama3":
        if scaling.original_max_position_embeddings > model.max_position_embeddings:
            out.append(
                "model.rope_scaling.original_max_position_embeddings "
                f"({scaling.original_max_position_embeddings}) must be <= "
                f"model.max_position_embeddings ({model.max_position_embeddings})"
            )
    return out


def _parallel(cfg: RunConfig) -> list[str]:
    par, out = cfg.parallel, []
    if par.zero_stage >= 2 and par.pipeline > 1:
        out.append(
            f"parallel.zero_stage ({par.zero_stage}) cannot be used with parallel.pipeline "
            f"({par.pipeline}) > 1: DeepSpeed's pipeline engine supports ZeRO 0 and 1 only"
        )
    if cfg.training.precision == "bf16" and par.zero_stage == 0:
        out.append(
            "training.precision (bf16) needs parallel.zero_stage >= 1: DeepSpeed's ZeRO-0 bf16 "
            "path accumulates gradients in bf16; ZeRO-1 keeps fp32 gradients and master weights "
            "(and costs nothing extra at data parallel size 1)"
        )
    if cfg.model.num_layers < par.pipeline:
        out.append(
            f"model.num_layers ({cfg.model.num_layers}) must be >= parallel.pipeline "
            f"({par.pipeline}): every pipeline stage needs a layer"
        )
    return out


def _batch(cfg: RunConfig) -> list[str]:
    train, dp = cfg.training, cfg.parallel.data
    accumulation, global_batch = train.gradient_accumulation_steps, train.global_batch_size
    if accumulation is None or global_batch is None or dp is None:
        return []  # not resolved (built without load_config); nothing to compare
    expected = train.micro_batch_size * accumulation * dp
    if global_batch != expected:
        return [
            f"training.global_batch_size ({global_batch}) must equal training.micro_batch_size "
            f"({train.micro_batch_size}) x training.gradient_accumulation_steps ({accumulation}) "
            f"x data parallel size ({dp}) = {expected}"
        ]
    return []


def _schedule(cfg: RunConfig) -> list[str]:
    sched, out = cfg.schedule, []
    if sched.min_lr > cfg.optimizer.lr:
        out.append(
            f"schedule.min_lr ({sched.min_lr:g}) must be <= optimizer.lr ({cfg.optimizer.lr:g})"
        )
    if sched.warmup_iters is not None:
        if sched.decay_iters is not None and sched.warmup_iters > sched.decay_iters:
            out.append(
                f"schedule.warmup_iters ({sched.warmup_iters}) must be <= "
                f"schedule.decay_iters ({sched.decay_iters})"
            )
        elif sched.warmup_iters > cfg.training.train_iters:
            out.append(
                f"schedule.warmup_iters ({sched.warmup_iters}) must be <= "
                f"training.train_iters ({cfg.training.train_iters})"
            )
    return out


def _evaluation(cfg: RunConfig) -> list[str]:
    interval = cfg.training.eval_interval
    split = cfg.data.split or []
    has_valid = cfg.data.valid is not None or (len(split) > 1 and split[1] > 0)
    t = cfg.training
    if t.eval_tasks:
        return _eval_tasks(cfg)
    if interval is not None and not has_valid:
        return [
            f"training.eval_interval ({interval}) needs data.valid (a validation blend) or a "
            "valid fraction in data.split"
        ]
    return []


def _eval_tasks(cfg: RunConfig) -> list[str]:
    """``training.eval_tasks``: lm-eval on the live weights (megatron/evaluation/in_loop.py)."""
    t, problems = cfg.training, []
    tasks = f"training.eval_tasks ({', '.join(t.eval_tasks)})"
    if t.eval_interval is None:
        problems.append(f"{tasks} run at evaluations: set training.eval_interval")
    elif t.eval_tasks_interval is not None and t.eval_tasks_interval % t.eval_interval:
        problems.append(
            f"training.eval_tasks_interval ({t.eval_tasks_interval}) must be a multiple of "
            f"training.eval_interval ({t.eval_interval})"
        )
    if cfg.parallel.pipeline > 1:
        problems.append(
            f"{tasks} need parallel.pipeline 1 (got {cfg.parallel.pipeline}); evaluate the saved "
            "checkpoints with tools/eval.py (any TP, no pipeline)"
        )
    if cfg.parallel.zero_stage > 2:
        problems.append(
            f"{tasks} need parallel.zero_stage <= 2 (got {cfg.parallel.zero_stage}: its "
            "replicas hold parameter partitions); evaluate the saved checkpoints with tools/eval.py"
        )
    if cfg.model.head == "value":
        problems.append(
            f"{tasks}: a model.head: {cfg.model.head} model has no language-model head (no "
            "log-likelihoods, no generation); drop training.eval_tasks"
        )
    return problems


def _objective(cfg: RunConfig) -> list[str]:
    cls = get_objective(cfg.objective.name)
    out = []
    if cfg.model.head != cls.model_head:
        what = {"lm": "next-token log-probs (the lm head)", "value": "a value head"}
        out.append(
            f"model.head: objective {cls.name!r} needs {what[cls.model_head]}; set model.head: "
            f"{cls.model_head} (got {cfg.model.head})"
        )
    return out + list(cls.check_config(cfg))


def _layout(cfg: RunConfig) -> list[str]:
    if not cfg.data.layout.startswith("prefix_shared"):
        return []
    cls, out = get_objective(cfg.objective.name), []
    if cls.batch_kind not in ("pair", "prompt"):
        out.append(
            f"data.layout ({cfg.data.layout}) needs an objective with pair batches (prompt, chosen, "
            f"rejected) or online RL's prompts; objective {cls.name!r} reads "
            f"{cls.batch_kind!r} batches: use data.layout: packed or padded"
        )
    return out


def _online(cfg: RunConfig) -> list[str]:
    """Online RL (objectives with ``prompt`` batches): rollouts, rewards and the grid."""
    cls = get_objective(cfg.objective.name)
    if cls.batch_kind != "prompt":
        if cfg.rewards:
            return [
                f"rewards: only online objectives (grpo, rloo, reinforce) read rewards; objective "
                f"{cls.name!r} trains on {cls.batch_kind!r} data"
            ]
        return []
    out, r, t = [], cfg.rollout, cfg.training
    name, par = cls.name, cfg.parallel
    if par.pipeline > 1:
        out.append(
            f"parallel.pipeline ({par.pipeline}): objective {name!r} samples completions with the "
            "policy's own decoder, which does not run across pipeline stages; use "
            "parallel.pipeline: 1 (tensor and data parallelism and ZeRO 0-3 work)"
        )
    dp = par.data or 1
    if r.prompts_per_step % dp:
        out.append(
            f"rollout.prompts_per_step ({r.prompts_per_step}) must be divisible by the data "
            f"parallel size ({dp}): each rank samples the same number of prompts"
        )
    g = int(getattr(cfg.objective.params, "num_generations", 1))
    completions, gbs = r.prompts_per_step * g, t.global_batch_size
    if gbs is not None and completions % gbs:
        out.append(
            f"rollout.prompts_per_step ({r.prompts_per_step}) x objective.num_generations ({g}) "
            f"= {completions} completions per rollout must be a multiple of "
            f"training.global_batch_size ({gbs}), the completions of one optimizer step"
        )
    if r.max_new_tokens >= cfg.data.seq_length:
        out.append(
            f"rollout.max_new_tokens ({r.max_new_tokens}) must be < data.seq_length "
            f"({cfg.data.seq_length}), which holds prompt + completion (and is <= "
            f"model.max_position_embeddings, {cfg.model.max_position_embeddings})"
        )
    if cfg.data.tokenizer is None:
        out.append(
            f"data.tokenizer: objective {name!r} decodes its completions for the reward "
            "functions; set data.tokenizer to the tokenizer directory the data was built with"
        )
    if not cfg.rewards:
        out.append(
            f"rewards: objective {name!r} needs at least one reward, e.g. rewards: "
            "[{function: rewards.py:accuracy}] or [{model: runs/rm}]"
        )
    if cfg.reference.source == "cache" or cfg.reference.cache is not None:
        out.append(
            f"reference.source (cache): objective {name!r} scores freshly sampled completions, "
            "which no precomputed cache holds; use reference.source: model"
        )
    return out


def reference_source(cfg: RunConfig) -> str:
    """The effective ``reference.source`` (``auto`` resolved against the objective)."""
    needs = get_objective(cfg.objective.name)(cfg.objective.params).needs_reference_model
    if cfg.reference.source == "auto":
        return "cache" if cfg.reference.cache else ("model" if needs else "none")
    return cfg.reference.source


def _reference(cfg: RunConfig) -> list[str]:
    name, ref = cfg.objective.name, cfg.reference
    needs = get_objective(name)(cfg.objective.params).needs_reference_model
    source = reference_source(cfg)
    if needs and source == "none":
        return [
            f"reference.source (none): objective {name!r} needs reference log-probs; use 'model' "
            "(a frozen reference beside the policy) or 'cache' (tools/precompute_reference.py)"
        ]
    if not needs and source in ("model", "cache"):
        return [
            f"reference.source ({source}): objective {name!r} with these settings uses no "
            "reference; remove the reference section"
        ]
    if source == "model" and cfg.parallel.pipeline > 1:
        return [
            f"reference.source (model) cannot be used with parallel.pipeline ({cfg.parallel.pipeline})"
            " > 1 yet: precompute the reference with tools/precompute_reference.py and use "
            "reference.source: cache"
        ]
    if ref.load is not None and source != "model":
        return [f"reference.load is only used with reference.source 'model' (got {source!r})"]
    return []


_RULES: tuple[Callable[[RunConfig], list[str]], ...] = (
    _attention,
    _positions,
    _parallel,
    _batch,
    _schedule,
    _evaluation,
    _objective,
    _layout,
    _reference,
    _online,
)


def validate_config(cfg: RunConfig, world_size: int | None = None) -> list[str]:
    """Cross-section problems of ``cfg`` (empty when it is consistent).

    Args:
        cfg: a config whose sections passed their own checks.
        world_size: the number of ranks, if known; checked against tensor x pipeline x data.

    Returns:
        One message per problem, each naming the fields and their values.
    """
    problems: list[str] = []
    par = cfg.parallel
    if world_size is not None and world_size != par.tensor * par.pipeline * (par.data or 1):
        problems.append(
            f"world size ({world_size}) must equal parallel.tensor ({par.tensor}) x "
            f"parallel.pipeline ({par.pipeline}) x data parallel size ({par.data})"
        )
    for rule in _RULES:
        problems.extend(rule(cfg))
    return problems
