"""The trainer: set-up, the train loop and evaluation. It never names an objective.

``Trainer(config).train()`` builds the grid, the model, the DeepSpeed engine and the data for the
registered objective's batch kind, resumes from ``checkpoint.load`` when given, and trains for
``training.train_iters`` optimizer steps. Each step's micro-batches come from a batch source
(:mod:`megatron.training.batch_source`): dataset rows, or for online objectives completions
sampled from the policy (:class:`megatron.rollout.source.RolloutSource`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from megatron.config import config_to_dict, deepspeed_config
from megatron.config.validate import reference_source
from megatron.data.batch import Batch
from megatron.data.builders import build_data
from megatron.data.sampler import GlobalBatchSampler
from megatron.model import GPTModel
from megatron.model.pipeline import build_pipeline_model, mark_tied_duplicates
from megatron.objectives import get_objective
from megatron.objectives.online import OnlineObjective
from megatron.parallel import ParallelState, RNGStatesTracker, model_parallel_seed
from megatron.training import checkpointing, signals
from megatron.training.batch_source import DatasetSource, micro_batches
from megatron.training.distributed import export_local_rank, import_deepspeed, init_distributed
from megatron.training.guards import TrainGuard
from megatron.training.metrics import MetricsLogger
from megatron.training.optimizer import build_optimizer, learning_rate, set_learning_rate
from megatron.training.pipeline_step import (
    PipelineLoss,
    pipeline_eval_step,
    pipeline_train_step,
)
from megatron.training.reference import (
    ReferenceCache,
    ReferenceKL,
    ReferenceModel,
    ReferenceProvider,
    cache_key,
    initial_weights,
)
from megatron.training.step import average_metrics, eval_step, grad_norm_meter, train_step
from megatron.utils import global_rank, log_rank0

StepHook = Callable[["Trainer", int], None]


class Trainer:
    """Owns the engine, data and bookkeeping of one run.

    Args:
        config: the resolved run config (from :func:`megatron.config.load_config`).
        hooks: callables ``hook(trainer, step)`` run after each completed step (and its
            checkpoint); used for fault injection in tests and by applications.
    """

    def __init__(self, config: Any, hooks: list[StepHook] | None = None) -> None:
        self.cfg = config
        self.hooks = list(hooks or [])
        self.step = 0
        self.stop_signal: int | None = None  # set when a rank was signalled to stop early
        self._setup()

    # ---- set-up -------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        self.dist_env = init_distributed(timeout_s=cfg.training.collective_timeout_s)
        self.device = self.dist_env.device
        export_local_rank(self.dist_env)  # DeepSpeed's engine reads it from os.environ
        log_rank0("launch: %s", self.dist_env.describe())
        self.state = ParallelState.build(cfg.parallel.tensor, cfg.parallel.pipeline)
        self.tracker = RNGStatesTracker()
        seed = cfg.training.seed
        model_parallel_seed(self.tracker, seed, self.state.tp_rank)
        np.random.seed(seed)
        random.seed(seed)
        objective_cls = get_objective(cfg.objective.name)
        self.objective = objective_cls(cfg.objective.params)
        self.online = isinstance(self.objective, OnlineObjective)
        # online RL scores tokens under the distribution they were sampled from
        self.temperature = cfg.rollout.temperature if self.online else 1.0
        self._build_engine()
        data = build_data(
            objective_cls.batch_kind,
            cfg.data,
            cfg.model.vocab_size,
            self.objective.collate_options(pipeline=self.state.pp_size > 1),
        )
        self.train_data, self.valid_data, self.collate = data.train, data.valid, data.collate
        if global_rank() == 0:
            for warning in self.objective.data_warnings(self.train_data):
                log_rank0("%s", warning, level=logging.WARNING)
        self.metrics = MetricsLogger(
            cfg.logging.dir or cfg.checkpoint.save or "runs/default",
            enabled=global_rank() == 0,
            tensorboard=cfg.logging.tensorboard,
            wandb_project=cfg.logging.wandb_project if cfg.logging.wandb else None,
            config=config_to_dict(cfg),
        )
        client = self._load() if cfg.checkpoint.load else None
        self.metrics.resume(self.step)  # drop records of steps an earlier attempt ran past this
        uses_reference = reference_source(cfg) != "none"
        self.reference_load = initial_weights(cfg, client) if uses_reference else None
        self.reference = self._build_reference()
        self.source = self._build_source()
        if client is not None:
            rank_state = checkpointing.load_rank_state(cfg.checkpoint.load)
            self.source.load_state_dict(client, rank_state)
        # the step's reference provider: none where the source's batches carry their values
        self.step_reference = None if self.source.provides_reference else self.reference
        self.task_evaluator = None
        if cfg.training.eval_tasks:  # lm-eval tasks on the live weights (training.eval_tasks)
            from megatron.evaluation.in_loop import TaskEvaluator

            self.task_evaluator = TaskEvaluator(cfg, self.engine, self.state)
        if getattr(self.objective, "needs_reference_hidden", False):  # the exact KL, per step
            self.step_reference = ReferenceKL(self.reference.model)
        log_rank0(
            "grid tp=%d pp=%d dp=%d zero=%d | %.2fM parameters on this rank | %d train samples",
            self.state.tp_size,
            self.state.pp_size,
            self.state.dp_size,
            cfg.parallel.zero_stage,
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            len(self.train_data),
        )

    def _build_engine(self) -> None:
        """Model (plain, or DeepSpeed pipeline stages when ``parallel.pipeline > 1``) + engine."""
        cfg, seed = self.cfg, self.cfg.training.seed
        outputs = self.objective.model_outputs
        self.pipe_loss: PipelineLoss | None = None
        self.weights_loaded = False
        if self.state.pp_size > 1:
            self.pipe_loss = PipelineLoss(self.objective, self.state.dp_group)
            self.model = build_pipeline_model(
                cfg.model, self.state, self.tracker, seed, self.pipe_loss, outputs=outputs
            )
            mark_tied_duplicates(self.model)
            mpu = None  # the pipeline module brings its own grid
        else:
            kwargs = {
                "tracker": self.tracker,
                "seed": seed,
                "outputs": outputs,
                "logprob_temperature": self.temperature,
            }
            # a finetune start builds the model from its checkpoint (no second copy at set-up)
            preloaded = checkpointing.preload_policy(cfg, self.state, **kwargs)
            self.weights_loaded = preloaded is not None
            if preloaded is None:
                preloaded = GPTModel(cfg.model, self.state, **kwargs)
            self.model = preloaded
            mpu = self.state.mpu
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        deepspeed = import_deepspeed()
        self.engine, *_ = deepspeed.initialize(
            model=self.model,
            optimizer=self.optimizer,
            config=deepspeed_config(cfg),
            mpu=mpu,
            dist_init_required=False,
        )
        self.grad_norm = grad_norm_meter(
            self.engine, self.optimizer, self.model, self.state, cfg.training.gradient_clipping
        )
        # after the meter: its pre-hook runs first and the guard's reads its norm
        self.guard = TrainGuard(
            cfg.training,
            self.engine,
            self.optimizer,
            self.grad_norm,
            self.objective.token_nll_metric,
            cfg.model.vocab_size,
            cfg.checkpoint.save,
        )

    def _sampler(self, n: int, shuffle: bool) -> GlobalBatchSampler:
        t = self.cfg.training
        return GlobalBatchSampler(
            n,
            t.micro_batch_size,
            self.state.dp_size,
            self.state.dp_rank,
            t.gradient_accumulation_steps,
            t.seed,
            shuffle=shuffle,
        )

    def _load(self) -> dict[str, Any] | None:
        ck = self.cfg.checkpoint
        client = checkpointing.load_checkpoint(
            self.engine,
            ck.load,
            ck.finetune,
            self.tracker,
            config=self.cfg,
            weights_loaded=self.weights_loaded,
        )
        if client is not None:
            self.step = int(client["step"])
        return client

    def _build_reference(self) -> ReferenceProvider | None:
        """The objective's reference log-probs (frozen model, cache or none), see reference.py."""
        source = reference_source(self.cfg)
        if source == "none":
            return None
        if source == "cache":
            key = cache_key(self.cfg, self.objective, self.reference_load)
            return ReferenceProvider(
                self.objective, cache=ReferenceCache(self.cfg.reference.cache, key)
            )
        model = ReferenceModel(
            self.cfg, self.state, self.device, self.reference_load, self.temperature
        )
        return ReferenceProvider(self.objective, model=model)

    def _build_source(self) -> Any:
        """Dataset rows, or rollouts of the policy for online objectives."""
        if not self.online:
            sampler = self._sampler(len(self.train_data), shuffle=True)
            return DatasetSource(self.train_data, self.collate, sampler)
        from megatron.rollout.setup import build_rollout_source

        wanted = self.reference is not None and self.objective.needs_reference_logps
        return build_rollout_source(self, self.reference.model if wanted else None)

    def _train_step(self, micro: list[Batch]) -> list[dict[str, Any]]:
        if self.pipe_loss is not None:
            return pipeline_train_step(
                self.engine, self.pipe_loss, micro, self.state, self.step_reference
            )
        return train_step(
            self.engine,
            self.objective,
            micro,
            self.device,
            self.step_reference,
            self.state.dp_group,
        )

    def _eval_step(self, micro: list[Batch], split: str) -> list[dict[str, Any]]:
        if self.pipe_loss is not None:
            return pipeline_eval_step(
                self.engine, self.pipe_loss, micro, self.state, self.reference, split
            )
        return eval_step(
            self.engine,
            self.objective,
            micro,
            self.device,
            self.reference,
            self.state.dp_group,
            split,
        )

    def _save(self) -> None:
        client = {
            "step": self.step,
            **self.source.state_dict(),  # the sampler's position (and a rollout's)
            "reference_load": self.reference_load,
            "finite": self.guard.finite,  # keep_last never prunes the newest finite checkpoint
        }
        checkpointing.save_checkpoint(
            self.engine,
            self.cfg.checkpoint.save,
            self.step,
            client,
            self.cfg,
            self.tracker,
            keep_last=self.cfg.checkpoint.keep_last,
            rank_state=self.source.rank_state(),
        )

    # ---- loop ---------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        """Train to ``training.train_iters``; returns the logged values of every step run here."""
        cfg, t = self.cfg, self.cfg.training
        first, history = self.step, []
        if self.step >= t.train_iters:
            log_rank0(
                "run already finished: step %d of training.train_iters %d in %s; nothing to do "
                "(raise training.train_iters to continue)",
                self.step,
                t.train_iters,
                cfg.checkpoint.load,
            )
            self.metrics.close()
            return history
        if self.step == 0 and self._evaluating():
            self.evaluate()  # the untrained baseline
        tokens_per_step = t.global_batch_size * self.cfg.data.seq_length
        while self.step < t.train_iters:
            lr = learning_rate(self.step + 1, cfg.optimizer.lr, cfg.schedule, t.train_iters)
            set_learning_rate(self.engine.optimizer, lr)
            start = time.time()
            micro, source_metrics = self.source.next_step()
            update_start = time.time()
            values = average_metrics(self._train_step(micro), self.state.dp_group)
            self.source.after_step()
            real = values.pop("real_tokens", None)  # mean per micro-batch, from the collator
            if real is not None:
                tokens_per_step = real * t.gradient_accumulation_steps * self.state.dp_size
            self.step += 1
            dt, update = time.time() - start, time.time() - update_start
            values.update(
                source_metrics, lr=lr, step_time=dt, tokens_per_s=tokens_per_step / update
            )
            values["samples_per_s"] = t.global_batch_size / dt
            if self.online:
                values["time/update"] = update
            grad_norm = (
                self.grad_norm.value if self.grad_norm else self.engine.get_global_grad_norm()
            )
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
            diverged = self.guard.check(self.step, values)  # the same verdict on every rank
            history.append(values)
            self.metrics.log(self.step, values)
            if self.step % cfg.logging.log_interval == 0 or self.step == t.train_iters:
                shown = self.objective.console_metrics
                self.metrics.console(self.step, t.train_iters, values, first, shown)
            if diverged is not None:
                self.metrics.close()
                raise diverged  # a DivergenceError, before any evaluation or save of this step
            if self._evaluating() and self.step % t.eval_interval == 0:
                self.evaluate()
            ck = cfg.checkpoint
            if ck.save and ck.save_interval and self.step % ck.save_interval == 0:
                self._save()
            for hook in self.hooks:
                hook(self, self.step)
            if (stop := signals.stop_agreed(self.device)) is not None:
                self.stop_signal = stop  # saved below; train.py says where to resume
                break
        final_eval = self._evaluating() and not self.stop_signal
        if final_eval and self.step % t.eval_interval:
            self.evaluate()  # the final weights, when the last step was not an evaluation step
        if cfg.checkpoint.save and (
            not cfg.checkpoint.save_interval or self.step % cfg.checkpoint.save_interval
        ):
            self._save()
        self.metrics.close()
        return history

    def _evaluating(self) -> bool:
        """Whether ``training.eval_interval`` has anything to evaluate."""
        t = self.cfg.training
        return bool(t.eval_interval) and (self.valid_data is not None or bool(t.eval_tasks))

    def evaluate(self) -> dict[str, float]:
        """Mean metrics over the first ``training.eval_iters`` global batches of validation data
        (or the source's own evaluation: online RL completes held-out prompts), plus the
        ``training.eval_tasks`` metrics when they are due."""
        result: dict[str, float] = {}
        if hasattr(self.source, "evaluate"):
            result = self.source.evaluate()
        elif self.valid_data is not None:
            sampler = self._sampler(len(self.valid_data), shuffle=False)
            values = []
            for _, indices in zip(range(self.cfg.training.eval_iters), sampler, strict=False):
                micro = micro_batches(indices, self.valid_data, self.collate)
                values += self._eval_step(micro, "valid")
            result = average_metrics(values, self.state.dp_group)
        if self.task_evaluator is not None and self.task_evaluator.due(self.step):
            result.update(self.task_evaluator.run(self.step))
        self.metrics.log(self.step, result, split="valid")
        log_rank0(
            "validation at step %d | %s",
            self.step,
            " | ".join(f"{k} {v:.4f}" for k, v in sorted(result.items())),
        )
        return result
