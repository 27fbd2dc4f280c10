"""Building the rollout source of a run (the trainer's part of online RL's set-up)."""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.data.indexed import DatasetError
from megatron.rollout.backend import BuiltinBackend
from megatron.rollout.rewards import RewardFunction, load_reward_function
from megatron.rollout.source import RewardSet, RolloutSource
from megatron.tokenizer import load_tokenizer


def build_rewards(cfg: Any, state: Any, device: Any) -> RewardSet:
    """The ``rewards`` entries, loaded (functions imported, reward models built beside the
    policy on its TP layout)."""
    loaded: list[RewardFunction] = []
    is_model = []
    for spec in cfg.rewards:
        if spec.function is not None:
            f = load_reward_function(spec.function, spec.weight)
            loaded.append(dataclasses.replace(f, name=spec.label))
            is_model.append(False)
        else:
            from megatron.rollout.reward_models import load_model_reward

            dtype = "bf16" if cfg.training.precision == "bf16" else "fp32"
            limit = cfg.data.seq_length
            loaded.append(load_model_reward(spec, state, device, dtype, limit))
            is_model.append(True)
    return RewardSet(loaded, is_model, state)


def _longest(dataset: Any) -> int:
    """The longest prompt of a (blended, split) prompt dataset, from its sources' metadata."""
    if hasattr(dataset, "datasets"):
        return max(_longest(d) for d in dataset.datasets)
    if hasattr(dataset, "dataset"):
        return _longest(dataset.dataset)
    return int(getattr(dataset, "meta", {}).get("max_sequence_length", 0))


def _check_lengths(train: Any, cfg: Any) -> None:
    """Every prompt plus ``rollout.max_new_tokens`` must fit ``data.seq_length``."""
    longest = _longest(train)
    need = longest + cfg.rollout.max_new_tokens
    if need > cfg.data.seq_length:
        raise DatasetError(
            f"data.train: the longest prompt has {longest} tokens; with rollout.max_new_tokens "
            f"{cfg.rollout.max_new_tokens} a completion needs {need} > data.seq_length "
            f"{cfg.data.seq_length}: raise data.seq_length (<= model.max_position_embeddings) or "
            "preprocess with a smaller --max-length"
        )


def build_rollout_source(trainer: Any, reference_model: Any) -> RolloutSource:
    """The :class:`RolloutSource` of ``trainer``'s run (its engine, grid and data)."""
    cfg = trainer.cfg
    _check_lengths(trainer.train_data, cfg)
    backend = BuiltinBackend(
        trainer.engine, trainer.state.dp_group, cfg.rollout.generation_batch_size
    )
    return RolloutSource(
        cfg,
        trainer.objective,
        trainer.engine,
        backend,
        trainer.state,
        trainer.device,
        trainer.train_data,
        trainer.valid_data,
        load_tokenizer(cfg.data.tokenizer),
        build_rewards(cfg, trainer.state, trainer.device),
        reference_model,
    )
