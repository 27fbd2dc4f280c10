"""Reward models as online RL rewards (``rewards: [{model: DIR, weight}]``).

A reward model scores each prompt + completion with the value at its last token, as the
``reward`` objective trains it (:mod:`megatron.scoring`). Two kinds:

* a native ``model.head: value`` checkpoint: built frozen beside the policy on the run's own TP
  layout (this rank's shard, resharded on load when the checkpoint was saved at another TP size;
  no optimizer state, no gradients);
* an exported Hugging Face ``*ForSequenceClassification`` directory (one full copy per rank).

The completion is re-tokenized with the reward model's own tokenizer from the decoded text, the
way its training pairs were built (:class:`megatron.scoring.RowEncoder`: ``prompt + completion``,
EOS appended to a string completion), so a reward model of another vocabulary works too. It is
wrapped as a :class:`~megatron.rollout.rewards.RewardFunction` with TRL's signature, so the
rollout scores functions and models alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron.ckpt import ConversionError
from megatron.ckpt.hf_config import model_config_from_section
from megatron.ckpt.layout import resolve_checkpoint
from megatron.ckpt.native import load_tp_shard, read_checkpoint_config
from megatron.data.indexed import DatasetError
from megatron.data.sources import RowError
from megatron.model import DTYPES
from megatron.model.gpt import build_loaded
from megatron.parallel import ParallelState
from megatron.rollout.rewards import RewardError, RewardFunction
from megatron.scoring import (
    HFRewardModel,
    NativeRewardModel,
    RowEncoder,
    ScoreError,
    last_token_values,
)
from megatron.tokenizer import load_tokenizer


class ShardedRewardModel:
    """A native reward model on the run's TP layout (see the module docstring).

    Raises:
        RewardError: not a checkpoint, or not a ``model.head: value`` one.
    """

    def __init__(self, ckpt: str, state: ParallelState, device: torch.device, dtype: str) -> None:
        try:
            root, config = read_checkpoint_config(ckpt)
            tag_dir = root / resolve_checkpoint(ckpt)[1]
            args = model_config_from_section(config.get("model") or {}, state.tp_size)
        except (ConversionError, ValueError) as e:
            raise RewardError(f"reward model {ckpt}: {e}") from e
        if args.head != "value":
            raise RewardError(
                f"reward model {ckpt}: model.head is {args.head!r} in {tag_dir / 'config.yml'}; "
                "a reward model is a model.head: value checkpoint (objective.name: reward)"
            )
        try:
            shard = load_tp_shard(tag_dir, args, state.tp_size, state.tp_rank, mmap=False)
        except ConversionError as e:
            raise RewardError(f"reward model {ckpt}: {e}") from e
        self.model = build_loaded(args, state, shard).to(device=device, dtype=DTYPES[dtype])
        self.model.eval().requires_grad_(False)
        self.root, self.config, self.vocab_size = root, config, args.vocab_size
        self.device = device

    default_tokenizer = NativeRewardModel.default_tokenizer

    def score(self, rows: list[list[int]], pad_id: int) -> list[float]:
        """The value at each row's last token (:func:`megatron.scoring.last_token_values`)."""
        return last_token_values(self.model, rows, pad_id, self.device)


class ModelReward:
    """A reward model as a TRL-signature reward function.

    Args:
        path: native checkpoint or Hugging Face directory.
        state: the run's grid (native models use its TP layout).
        device: where to run.
        dtype: ``fp32`` or ``bf16``.
        tokenizer: its tokenizer directory (default: the model's own, see :class:`RewardSpec`).
        max_length: longest prompt + completion it scores (longer prompts are cut from the
            left, as ``--length-policy truncate_prompt``); ``None``: no limit.
        batch_size: rows per forward.
    """

    def __init__(
        self,
        path: str,
        state: ParallelState,
        device: torch.device,
        dtype: str = "fp32",
        tokenizer: str | None = None,
        max_length: int | None = None,
        batch_size: int = 16,
    ) -> None:
        self.path, where = path, Path(path)
        try:
            if (where / "config.json").is_file():
                self.model: Any = HFRewardModel(path, str(device), dtype)
            elif (where / "latest").is_file() or (where / "config.yml").is_file():
                self.model = ShardedRewardModel(path, state, device, dtype)
            else:
                raise RewardError(
                    f"reward model {path}: neither a Hugging Face model directory (config.json) "
                    "nor a native checkpoint (latest, or an iter_* directory with config.yml)"
                )
            tok_dir = tokenizer or self.model.default_tokenizer()
            if tok_dir is None:
                raise RewardError(
                    f"reward model {path}: no tokenizer (its config has no data.tokenizer and it "
                    "has no hf/ directory); set the reward's tokenizer"
                )
            self.encoder = RowEncoder(load_tokenizer(str(tok_dir)), None, max_length, True)
        except ScoreError as e:
            raise RewardError(f"reward model {path}: {e}") from e
        self.batch_size = batch_size

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        rows = []
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            try:
                rows.append(self.encoder.encode({"prompt": p, "completion": c}))
            except (RowError, DatasetError) as e:
                message = getattr(e, "message", str(e))
                raise RewardError(f"reward model {self.path}: completion {i}: {message}") from e
        pad = self.encoder.ctx.tokenizer.pad_id
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        scores = [0.0] * len(rows)
        for start in range(0, len(order), self.batch_size):
            part = order[start : start + self.batch_size]
            for i, s in zip(part, self.model.score([rows[i] for i in part], pad), strict=True):
                scores[i] = s
        return scores


def load_model_reward(
    spec: Any, state: ParallelState, device: torch.device, dtype: str, max_length: int | None
) -> RewardFunction:
    """A ``rewards`` entry with ``model`` as a :class:`RewardFunction`."""
    fn = ModelReward(spec.model, state, device, dtype, spec.tokenizer, max_length)
    return RewardFunction(name=spec.label, spec=f"model:{spec.model}", fn=fn, weight=spec.weight)
