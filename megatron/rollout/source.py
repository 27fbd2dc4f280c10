"""The rollout batch source: online RL's micro-batches, sampled from the policy itself.

The trainer asks its batch source for each optimizer step's micro-batches
(:mod:`megatron.training.batch_source`); for an online objective (``batch_kind = "prompt"``) that
is a :class:`RolloutSource`. Each *rollout*:

1. takes ``rollout.prompts_per_step`` prompts (the resumable, seeded, data-parallel-sharded
   sampler: rank ``r`` holds a contiguous slice);
2. samples G = ``objective.num_generations`` completions of each through the generation backend
   (the policy's own decoder; completion ``c`` of the rollout — global index, prompt-major — draws
   its tokens from a stream seeded by ``(training.seed, rollout, c)``, so every TP x DP x ZeRO
   grid samples the same completions);
3. scores them with the ``rewards`` (functions on TP rank 0, broadcast to the TP group; reward
   models on every rank of it) and gathers every rank's rewards;
4. computes, where the objective needs them, the sampling policy's and the reference model's
   log-probs of the completions (no-grad forwards over the very micro-batches it will train on);
5. asks the objective for the advantages of the whole rollout (identical on every rank).

It then yields ``passes = num_iterations x steps`` optimizer steps over the completions, ``steps =
prompts_per_step x G / training.global_batch_size``. Step ``s`` of a pass takes the rank's
completions whose index is ``s`` modulo ``steps`` — a strided split, so the completions of a step
(over all ranks) do not depend on the data-parallel size — in micro-batches of
``training.micro_batch_size``. The rollout's metrics (TRL's names: ``reward``, ``reward_std``,
``rewards/<name>/{mean,std}``, ``frac_reward_zero_std``, ``completions/*``, ``num_tokens``, plus
timings) are logged with its first step. A checkpoint in the middle of a rollout keeps this rank's
completions (:func:`megatron.rollout.buffer.buffer_state`), so a resume trains on exactly the
same samples.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron.data.sampler import GlobalBatchSampler
from megatron.model.generate import SamplingConfig
from megatron.objectives.online import OnlineObjective, RolloutStats
from megatron.rollout.advantages import nanstd
from megatron.rollout.buffer import (
    Completion,
    CompletionCollator,
    buffer_state,
    flat_outputs,
    gather_tokens,
    load_buffer,
    micro_batches,
)
from megatron.rollout.rewards import RewardError, RewardFunction, combine, function_values
from megatron.training.step import forward_outputs
from megatron.utils import log_rank0

logger = logging.getLogger(__name__)


EVAL_SAMPLES = 3
"""Held-out completions rank 0 logs at each evaluation (prompt, completion, total reward)."""


def completion_seed(seed: int, rollout: int, index: int, evaluation: bool = False) -> int:
    """The sampling seed of completion ``index`` (global, prompt-major) of rollout ``rollout``
    (or of held-out prompt ``index`` at evaluation ``rollout``)."""
    parts = [seed, int(evaluation), rollout, index]
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


def _gather(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    """Every rank of ``group``'s ``obj``, in group rank order."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


class RewardSet:
    """The run's rewards (functions and reward models) in config order.

    Functions run on TP rank 0 of each replica and their values are broadcast to the TP group
    (a function need not be deterministic, and may be slow); reward models run on every rank (a
    native one is TP-sharded).
    """

    def __init__(self, rewards: list[RewardFunction], is_model: list[bool], state: Any) -> None:
        self.rewards, self.is_model, self.state = rewards, is_model, state

    @property
    def functions(self) -> list[RewardFunction]:
        return self.rewards

    def values(self, prompts, completions, columns, completion_ids, rows) -> torch.Tensor:
        """``[B, F]`` values (NaN = not applicable); raises :class:`RewardError` on every rank of
        the TP group when one function fails."""
        args = (prompts, completions, columns, completion_ids, rows)
        funcs = [r for r, m in zip(self.rewards, self.is_model, strict=True) if not m]
        models = [r for r, m in zip(self.rewards, self.is_model, strict=True) if m]
        payload: Any = None
        if self.state.tp_rank == 0 and funcs:
            try:
                payload = function_values(funcs, *args)
            except RewardError as e:
                payload = str(e)
        group = self.state.tp_group
        if funcs and group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            box = [payload]
            dist.broadcast_object_list(box, src=self.state.tp_ranks[0], group=group)
            payload = box[0]
        if isinstance(payload, str):
            raise RewardError(payload)
        model_values = function_values(models, *args) if models else None
        out = torch.empty(len(completions), len(self.rewards))
        f = m = 0
        for j, is_model in enumerate(self.is_model):
            if is_model:
                out[:, j] = model_values[:, m]
                m += 1
            else:
                out[:, j] = payload[:, f]
                f += 1
        return out


class RolloutSource:
    """Online RL's batch source (see the module docstring).

    Args:
        cfg: the run config.
        objective: the online objective.
        engine: the DeepSpeed engine (policy forwards for old log-probs).
        backend: the generation backend.
        state: the parallel grid.
        device: this rank's device.
        train: the ``prompt`` dataset of ``data.train``.
        valid: that of ``data.valid``, or ``None``.
        tokenizer: the run's tokenizer (decodes completions for the rewards).
        rewards: the run's :class:`RewardSet`.
        reference: a :class:`~megatron.training.reference.ReferenceModel`, or ``None``.
    """

    provides_reference = True
    """The rollout computes reference log-probs itself; steps get no reference provider."""

    def __init__(
        self,
        cfg: Any,
        objective: OnlineObjective,
        engine: Any,
        backend: Any,
        state: Any,
        device: torch.device,
        train: Any,
        valid: Any,
        tokenizer: Any,
        rewards: RewardSet,
        reference: Any = None,
    ) -> None:
        self.cfg, self.objective, self.engine, self.backend = cfg, objective, engine, backend
        self.state, self.device, self.train, self.valid = state, device, train, valid
        self.tokenizer, self.rewards, self.reference = tokenizer, rewards, reference
        r, t = cfg.rollout, cfg.training
        self.G = objective.num_generations
        self.steps = r.prompts_per_step * self.G // t.global_batch_size
        self.passes = objective.num_iterations * self.steps
        self.need_old = objective.needs_old_logps(self.passes)
        self.need_ref = reference is not None
        self.sampling = SamplingConfig(
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p
        )
        self.sampler = GlobalBatchSampler(
            len(train), r.prompts_per_step // state.dp_size, state.dp_size, state.dp_rank, 1, t.seed
        )
        self._prompts = iter(self.sampler)
        self.collate = CompletionCollator(
            cfg.data.layout, cfg.data.seq_length, cfg.data.pad_to_multiple_of
        )
        self.eos = tokenizer.eos_id
        self.rollouts = 0  # rollouts taken
        self.position = 0  # optimizer steps taken on the current rollout
        self.num_tokens = 0  # prompt + completion tokens of every rollout so far (TRL's)
        self.buffer: list[Completion] | None = None
        self.step_items: list[float] = []

    # ---- steps --------------------------------------------------------------------------------
    def next_step(self) -> tuple[list[Any], dict[str, float]]:
        """This rank's micro-batches of the next optimizer step, and the metrics of the rollout
        taken for it (empty unless a new rollout started)."""
        metrics: dict[str, float] = {}
        if self.buffer is None or self.position >= self.passes:
            metrics = self._rollout()
        s = self.position % self.steps
        mine = self.buffer[s :: self.steps]
        t = self.cfg.training
        micro = micro_batches(
            mine,
            self.collate,
            t.micro_batch_size,
            num_items=self.step_items[s],
            max_new_tokens=self.sampling.max_new_tokens,
            # the policy is still the sampler's on the first step: compare their log-probs
            with_sampler_logps=self.position == 0 and not self.need_old,
        )
        self.position += 1
        return micro, metrics

    def after_step(self) -> None:
        """Called after each optimizer step: the backend serves the new weights."""
        self.backend.sync_weights()

    # ---- one rollout --------------------------------------------------------------------------
    def _rollout(self) -> dict[str, float]:
        start = time.time()
        indices = next(self._prompts)[0]
        rows = [self.train[i] for i in indices]
        completions, gen_s = self._sample(indices, rows, self.rollouts)
        t_rewards = time.time()
        prompts, texts, columns = self._reward_inputs(rows, completions, self.G)
        ids = [c.tokens.tolist() for c in completions]
        examples = [c.example for c in completions]
        values = self._gather_rewards(prompts, texts, columns, ids, examples)  # [N, F]
        scores = combine(values, self.rewards.functions)
        rewards_s = time.time() - t_rewards
        t_logps = time.time()
        metrics = self._logps(completions)
        stats = self._stats(completions)
        advantages, adv_metrics = self.objective.advantages(scores.total, stats)
        n = len(completions)
        mine = advantages[self.state.dp_rank * n : (self.state.dp_rank + 1) * n]
        for c, a in zip(completions, mine.tolist(), strict=True):
            c.advantage = float(a)
        self.buffer, self.position = completions, 0
        self.step_items = self._step_items(completions)
        logps_s = time.time() - t_logps
        self.rollouts += 1
        metrics.update(scores.metrics, **adv_metrics)
        (generated, prompt_tokens), metrics_c = self._completion_metrics(completions, scores.total)
        self.num_tokens += generated + prompt_tokens
        metrics.update(metrics_c, num_tokens=float(self.num_tokens))
        metrics.update(
            {
                "time/rollout": time.time() - start,
                "time/generation": gen_s,
                "time/rewards": rewards_s,
                "time/logprobs": logps_s,
                "tokens_per_s/generation": generated / max(gen_s, 1e-9),
            }
        )
        return metrics

    def _sample(
        self, indices: list[int], rows: list[dict[str, Any]], rollout: int
    ) -> tuple[list[Completion], float]:
        """G completions of each prompt (``rollout`` seeds them; see the module docstring)."""
        t0 = time.time()
        prompts = [row["prompt"] for row in rows for _ in range(self.G)]
        first = self.state.dp_rank * len(prompts)
        seeds = [
            completion_seed(self.cfg.training.seed, rollout, first + k) for k in range(len(prompts))
        ]
        unique = [row["prompt"].tolist() for row in rows]  # each prefilled once for its G rows
        out = self.backend.generate(unique, self.sampling, seeds, self.eos, self.G)
        examples = [i for i in indices for _ in range(self.G)]
        masked = self.objective.mask_truncated_completions
        completions = self._completions(examples, prompts, out, self.sampling, masked)
        return completions, time.time() - t0

    def _completions(
        self,
        examples: list[int],
        prompts: list[Any],
        out: list[tuple[list[int], list[float]]],
        sampling: SamplingConfig,
        mask_truncated: bool = False,
    ) -> list[Completion]:
        """The backend's output as :class:`Completion` records (one per prompt in ``prompts``)."""
        completions = []
        for example, prompt, (tokens, logps) in zip(examples, prompts, out, strict=True):
            truncated = len(tokens) >= sampling.max_new_tokens and tokens[-1] != self.eos
            completions.append(
                Completion(
                    example=int(example),
                    prompt=np.asarray(prompt, dtype=np.int64),
                    tokens=np.asarray(tokens, dtype=np.int64),
                    sampler_logps=np.asarray(logps, dtype=np.float32),
                    truncated=truncated,
                    trained=not (truncated and mask_truncated),
                )
            )
        return completions

    def _gather_rewards(self, prompts, completions, columns, completion_ids, rows) -> torch.Tensor:
        """``[N, F]`` every rank's reward values in rank order; a :class:`RewardError` on any
        rank is raised on all of them (none is left waiting in a collective)."""
        try:
            local: Any = self.rewards.values(prompts, completions, columns, completion_ids, rows)
        except RewardError as e:
            local = str(e)
        gathered = _gather(local, self.state.dp_group)
        errors = [g for g in gathered if isinstance(g, str)]
        if errors:
            raise RewardError(errors[0])
        return torch.cat(gathered)

    def _reward_inputs(
        self, rows: list[dict[str, Any]], completions: list[Completion], repeat: int
    ) -> tuple[list[Any], list[Any], dict[str, list[Any]]]:
        """TRL's reward-function arguments: the prompts as the data gave them (strings or
        message lists), the decoded completions (``[{"role": "assistant", "content": ...}]``
        for conversational prompts) and every other column of the prompt rows (``repeat``
        completions per row)."""
        prompts, texts, columns = [], [], {}
        records = [row.get("row") or {} for row in rows for _ in range(repeat)]
        for record, row_c in zip(records, completions, strict=True):
            prompt = record.get("prompt")
            if prompt is None:  # a dataset preprocessed before rows were kept
                prompt = self.tokenizer.decode(row_c.prompt.tolist(), skip_special_tokens=True)
            text = self.tokenizer.decode(row_c.tokens.tolist(), skip_special_tokens=True)
            prompts.append(prompt)
            texts.append(
                [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
            )
        keys = sorted({k for r in records for k in r} - {"prompt", "completion", "completion_ids"})
        for key in keys:
            columns[key] = [r.get(key) for r in records]
        return prompts, texts, columns

    @torch.no_grad()
    def _logps(self, completions: list[Completion]) -> dict[str, float]:
        """The old-policy and reference log-probs of every trained token, forwarded over the
        micro-batches the steps will use; ``sampling/logp_difference`` when old ones exist."""
        if not (self.need_old or self.need_ref):
            return {}
        was_training = self.engine.training
        self.engine.eval()
        try:
            for s in range(self.steps):
                part = completions[s :: self.steps]
                batches = micro_batches(
                    part,
                    self.collate,
                    self.cfg.training.micro_batch_size,
                    num_items=1.0,
                    max_new_tokens=self.sampling.max_new_tokens,
                )
                for k, batch in enumerate(batches):
                    batch = batch.to(self.device)
                    chunk = part[k * self.cfg.training.micro_batch_size :][: batch.num_sequences]
                    if self.need_old:
                        out = forward_outputs(self.engine, batch)
                        flat = flat_outputs(batch, out["token_logps"], out.get("extra_logps"))
                        for c, v in zip(chunk, gather_tokens(batch, flat), strict=True):
                            c.old_logps = v if c.trained else None
                    if self.need_ref:
                        out = self.reference.outputs(batch)
                        flat = flat_outputs(batch, out["token_logps"], out.get("extra_logps"))
                        for c, v in zip(chunk, gather_tokens(batch, flat), strict=True):
                            c.ref_logps = v if c.trained else None
        finally:
            self.engine.train(was_training)
        if not self.need_old:
            return {}
        diffs = [
            np.abs(c.old_logps - c.sampler_logps)
            for c in completions
            if c.trained and c.tokens.size
        ]
        flat = np.concatenate(diffs) if diffs else np.zeros(0)
        total = torch.tensor([flat.sum(), flat.size], dtype=torch.float64)
        worst = torch.tensor([flat.max() if flat.size else 0.0], dtype=torch.float64)
        if dist.is_initialized() and self.state.dp_size > 1:
            dist.all_reduce(total, group=self.state.dp_group)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=self.state.dp_group)
        return {
            "sampling/logp_difference/mean": float(total[0] / max(float(total[1]), 1.0)),
            "sampling/logp_difference/max": float(worst[0]),
        }

    def _stats(self, completions: list[Completion]) -> RolloutStats:
        """Every rank's per-completion statistics, in rollout order."""

        def sums(name: str) -> list[float]:
            return [
                float(np.sum(getattr(c, name))) if getattr(c, name) is not None else 0.0
                for c in completions
            ]

        local = {"tokens": [float(c.trained_tokens) for c in completions]}
        if self.need_old:
            local["old"] = sums("old_logps")
        if self.need_ref:
            local["ref"] = sums("ref_logps")
        merged: dict[str, list[float]] = {}
        for part in _gather(local, self.state.dp_group):
            for k, v in part.items():
                merged.setdefault(k, []).extend(v)
        t = {k: torch.tensor(v, dtype=torch.float32) for k, v in merged.items()}
        return RolloutStats(
            old_sums=t.get("old"),
            ref_sums=t.get("ref"),
            old_ref_tokens=t["tokens"],
        )

    def _step_items(self, completions: list[Completion]) -> list[float]:
        """Per step of a pass, its trained completion tokens over all ranks / (dp x accumulation)
        (:attr:`RolloutFields.num_items`)."""
        counts = torch.tensor(
            [
                float(sum(c.trained_tokens for c in completions[s :: self.steps]))
                for s in range(self.steps)
            ],
            dtype=torch.float64,
        )
        if dist.is_initialized() and self.state.dp_size > 1:
            dist.all_reduce(counts, group=self.state.dp_group)
        scale = self.state.dp_size * self.cfg.training.gradient_accumulation_steps
        return (counts / scale).tolist()

    def _completion_metrics(
        self, completions: list[Completion], total: torch.Tensor
    ) -> tuple[tuple[int, int], dict[str, float]]:
        """``((completion tokens, prompt tokens) over every rank, TRL's rollout metrics)``."""
        local = [(int(c.tokens.size), bool(c.truncated), int(c.prompt.size)) for c in completions]
        merged = [x for part in _gather(local, self.state.dp_group) for x in part]
        lengths = np.array([x[0] for x in merged], dtype=np.float64)
        truncated = np.array([x[1] for x in merged], dtype=bool)
        done = lengths[~truncated]
        metrics = {
            "reward": float(torch.nanmean(total)),
            "reward_std": float(nanstd(total)),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(truncated.mean()),
            "completions/mean_terminated_length": float(done.mean()) if done.size else 0.0,
            "completions/min_terminated_length": float(done.min()) if done.size else 0.0,
            "completions/max_terminated_length": float(done.max()) if done.size else 0.0,
        }
        if math.isnan(metrics["reward"]):
            log_rank0(
                "no reward function applied to any completion of this rollout",
                level=logging.WARNING,
            )
        return (int(lengths.sum()), sum(x[2] for x in merged)), metrics

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out prompts (``data.valid``, ``rollout.eval_prompts`` of them, split over the
        data-parallel ranks), one completion each at ``rollout.eval_temperature`` (0: greedy),
        scored by the rewards: ``reward``, ``rewards/<name>/mean``, ``completions/*``."""
        r = self.cfg.rollout
        n = min(len(self.valid), r.eval_prompts or len(self.valid))
        indices = np.array_split(np.arange(n), self.state.dp_size)[self.state.dp_rank].tolist()
        rows = [self.valid[i] for i in indices]
        sampling = SamplingConfig(
            max_new_tokens=r.max_new_tokens,
            temperature=r.eval_temperature,
            top_k=r.top_k,
            top_p=r.top_p,
        )
        prompts = [row["prompt"].tolist() for row in rows]
        seeds = [completion_seed(self.cfg.training.seed, 0, i, evaluation=True) for i in indices]
        out = self.backend.generate(prompts, sampling, seeds, self.eos)
        completions = self._completions(indices, prompts, out, sampling)
        p_in, texts, columns = self._reward_inputs(rows, completions, 1)
        ids = [c.tokens.tolist() for c in completions]
        values = self._gather_rewards(p_in, texts, columns, ids, indices)
        scores = combine(values, self.rewards.functions)
        # a sample of what the policy generates now, next to the numbers (rank 0's first rows,
        # which lead the gathered rewards)
        for prompt, text, total in list(zip(p_in, texts, scores.total.tolist(), strict=False))[
            :EVAL_SAMPLES
        ]:
            log_rank0("  held-out %r -> %r (reward %.3f)", str(prompt)[-80:], text[:120], total)
        return {**scores.metrics, **self._completion_metrics(completions, scores.total)[1]}

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The client state (the same on every rank): sampler, rollout position, objective."""
        return {
            "sampler": self.sampler.state_dict(),
            "rollout": {
                "rollouts": self.rollouts,
                "position": self.position,
                "passes": self.passes,
                "num_tokens": self.num_tokens,
                "step_items": list(self.step_items),
                "objective": self.objective.state_dict(),
            },
        }

    def rank_state(self) -> dict[str, Any] | None:
        """This rank's completions when a rollout is not finished (saved per rank), else None."""
        if self.buffer is None or self.position >= self.passes:
            return None
        return buffer_state(self.buffer)

    def load_state_dict(self, client: dict[str, Any], rank_state: dict[str, Any] | None) -> None:
        """Resume from :meth:`state_dict` and this rank's :meth:`rank_state`.

        Raises:
            ValueError: the checkpoint stopped inside a rollout whose completions it lacks, or
                the rollout had another number of steps.
        """
        self.sampler.load_state_dict(client["sampler"])
        self._prompts = iter(self.sampler)
        saved = client.get("rollout") or {}
        self.rollouts = int(saved.get("rollouts", 0))
        self.position = int(saved.get("position", 0))
        self.num_tokens = int(saved.get("num_tokens", 0))
        self.step_items = [float(x) for x in saved.get("step_items", [])]
        self.objective.load_state_dict(saved.get("objective") or {})
        mid = saved and self.position < int(saved.get("passes", self.passes))
        if mid and int(saved.get("passes", 0)) != self.passes:
            raise ValueError(
                f"the checkpoint stopped at step {self.position} of a rollout of "
                f"{saved.get('passes')} optimizer steps; this run's rollouts take {self.passes} "
                "(keep rollout.prompts_per_step, objective.num_generations, num_iterations and "
                "training.global_batch_size to resume it)"
            )
        if mid and rank_state is None:
            raise ValueError(
                f"the checkpoint stopped at step {self.position} of a rollout but holds no "
                "rollout buffer for this rank (saved by a different number of ranks?)"
            )
        self.buffer = load_buffer(rank_state) if mid else None
        if not mid:
            self.position = self.passes  # the next step starts a new rollout
