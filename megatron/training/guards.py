"""Divergence and collapse guards of the train loop.

``training.on_nonfinite`` decides what a step with a non-finite loss or gradient norm does:

* ``stop`` (default): the run ends with :class:`DivergenceError` naming the step, the quantity,
  its value and the last good checkpoint, before anything is saved for that step;
* ``skip_step``: the optimizer update of that step is dropped (weights and optimizer state
  unchanged; the step counter and the learning-rate schedule still advance, its data is
  consumed), counted in the ``skipped_steps`` metric and logged as a warning; after
  ``training.max_consecutive_skips`` skips in a row the run stops as with ``stop``.

No update computed from non-finite gradients is ever applied, in either mode. Where DeepSpeed
wraps the optimizer (ZeRO 1-3, bf16, fp16) it already drops such updates itself: every wrapper of
DeepSpeed 0.19 computes the global norm first and returns without calling the torch optimizer when
it is invalid (``is_invalid_grad_norm`` in ``stage_1_and_2.py``, ``stage3.py``,
``bf16_optimizer.py``; fp16's dynamic loss scaler), reports the norm as ``inf`` and counts the step
in ``engine.skipped_steps``. Only the plain torch optimizer (fp32 at ZeRO-0, with or without
pipeline stages) would apply them; there :class:`NonFiniteUpdateFilter`, a step pre-hook like
:class:`~megatron.training.step.GradNormMeter`, drops them. With fp16 an overflowing gradient is
DeepSpeed's loss scaler's business (it lowers the scale and skips the step; that is normal at the
start of a run), so only the loss is checked there.

Agreement: each step's flags (loss non-finite, gradient norm non-finite, update dropped) are
all-reduced with MAX over the world group, so every rank, on every TP/PP/DP coordinate, takes the
same decision at the same step even where a value is known on some ranks only.

Collapse (a warning, no stop): for objectives whose loss is a per-token NLL
(``Objective.token_nll_metric``), the NLL staying within :data:`COLLAPSE_TOLERANCE` of
``ln(model.vocab_size)`` — the cross-entropy of uniform predictions — or a gradient norm of
exactly 0, for ``training.collapse_steps`` steps in a row, is reported once per such stretch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron.training.checkpointing import newest_finite_checkpoint
from megatron.utils import log_rank0

COLLAPSE_TOLERANCE = 1e-3
"""Nats: |NLL - ln V| below this counts as uniform predictions (a collapsed run sits at ln V to
fp32 round-off; a freshly initialised one is typically a few 1e-3 above it)."""


class DivergenceError(RuntimeError):
    """The run stopped on non-finite values; ``str(error)`` is the one-line message for the user.

    Attributes:
        step: the step whose loss or gradient norm was non-finite.
    """

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


@dataclass
class StepFlags:
    """What one step looked like, agreed across ranks.

    Attributes:
        loss_bad: the loss was non-finite on some rank.
        grad_bad: the gradient norm was non-finite on some rank (never set under fp16).
        update_dropped: the optimizer update was not applied on any rank.
    """

    loss_bad: bool
    grad_bad: bool
    update_dropped: bool


def _describe(flags: StepFlags, loss: float | None, grad_norm: float | None) -> str:
    """``loss is nan (grad_norm 1.2)``, ``grad_norm is inf (loss 4.8)``, or both non-finite."""
    quantities = (("loss", loss, flags.loss_bad), ("grad_norm", grad_norm, flags.grad_bad))
    bad = [f"{name} is {_fmt(v)}" for name, v, is_bad in quantities if is_bad]
    good = [f"{name} {_fmt(v)}" for name, v, is_bad in quantities if not is_bad and v is not None]
    return " and ".join(bad) + (f" ({good[0]})" if good else "")


class DivergenceGuard:
    """The decisions of ``training.on_nonfinite`` and the collapse warning, in pure Python.

    Args:
        mode: ``"stop"`` or ``"skip_step"``.
        max_consecutive_skips: ``skip_step`` stops after this many dropped updates in a row.
        collapse_steps: warn after this many steps in a row at ``uniform_loss`` or with gradient
            norm exactly 0; 0 disables the warning.
        uniform_loss: ``ln(vocab_size)`` where the objective's loss is a per-token NLL, else None.
    """

    def __init__(
        self,
        mode: str,
        max_consecutive_skips: int,
        collapse_steps: int,
        uniform_loss: float | None,
    ) -> None:
        self.mode, self.max_skips = mode, max_consecutive_skips
        self.collapse_steps, self.uniform_loss = collapse_steps, uniform_loss
        self.skipped = 0
        self.consecutive = 0
        self.last_finite = True
        self._uniform_run = 0
        self._zero_run = 0

    def observe(
        self,
        step: int,
        flags: StepFlags,
        loss: float | None,
        grad_norm: float | None,
        nll: float | None = None,
        last_checkpoint: str | None = None,
    ) -> tuple[DivergenceError | None, list[str]]:
        """Account for one finished step.

        Args:
            step: the step just run (1-based).
            flags: the agreed :class:`StepFlags` of the step.
            loss: the step's (data-parallel mean) loss, for the messages.
            grad_norm: the step's global gradient norm (None when unknown).
            nll: the per-token NLL the collapse check compares with ``uniform_loss``.
            last_checkpoint: the newest checkpoint whose step was finite (for the message).

        Returns:
            ``(error, warnings)``: the :class:`DivergenceError` to raise (None to go on) and the
            warning lines to log.
        """
        bad = flags.loss_bad or flags.grad_bad
        self.last_finite = not bad
        warnings = self._collapse(step, nll, grad_norm) if not bad else []
        if not bad:
            self.consecutive = 0
            return None, warnings
        where = _describe(flags, loss, grad_norm)
        last = last_checkpoint or "none saved yet"
        tail = f"nothing saved for step {step}; last good checkpoint: {last}"
        if self.mode == "stop":
            msg = f"training stopped at step {step}: {where}; {tail} [training.on_nonfinite: stop]"
            return DivergenceError(msg, step), warnings
        if not flags.update_dropped:
            msg = (
                f"training stopped at step {step}: {where} but finite gradients, so the update "
                f"was applied and cannot be skipped; {tail}"
            )
            return DivergenceError(msg, step), warnings
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_skips:
            msg = (
                f"training stopped at step {step}: {self.consecutive} consecutive steps skipped "
                f"(training.max_consecutive_skips: {self.max_skips}), the last because {where}; "
                f"last good checkpoint: {last}"
            )
            return DivergenceError(msg, step), warnings
        warnings.append(
            f"step {step}: update skipped, {where}; {self.consecutive} in a row, "
            f"{self.skipped} in this run [training.on_nonfinite: skip_step]"
        )
        return None, warnings

    def _collapse(self, step: int, nll: float | None, grad_norm: float | None) -> list[str]:
        if not self.collapse_steps:
            return []
        out = []
        uniform = (
            self.uniform_loss is not None
            and nll is not None
            and abs(nll - self.uniform_loss) < COLLAPSE_TOLERANCE
        )
        self._uniform_run = self._uniform_run + 1 if uniform else 0
        if self._uniform_run == self.collapse_steps:
            out.append(
                f"step {step}: the per-token loss has been {nll:.4f} = ln(model.vocab_size) "
                f"(uniform predictions) for {self.collapse_steps} steps: the model has collapsed "
                "(too high optimizer.lr?)"
            )
        self._zero_run = self._zero_run + 1 if grad_norm == 0.0 else 0
        if self._zero_run == self.collapse_steps:
            out.append(
                f"step {step}: the gradient norm has been exactly 0 for {self.collapse_steps} "
                "steps: the model no longer learns (too high optimizer.lr?)"
            )
        return out


class NonFiniteUpdateFilter:
    """Torch optimizer step pre-hook dropping an update whose gradients are non-finite.

    It sees the final (accumulated, data-parallel-reduced, clipped) gradients right before the
    update, on every rank (DP ranks, and every pipeline stage: DeepSpeed's ``TrainSchedule`` ends
    each batch with ``OptimizerStep`` on all stages). A local flag (a non-finite gradient on this
    rank, or a non-finite norm from the ``meter`` hooked before it) is all-reduced with MAX over
    the world group; when set, every ``p.grad`` becomes ``None`` and torch's optimizers leave those
    parameters and their state untouched (``AdamW`` skips parameters without a gradient, weight
    decay included).

    Args:
        meter: the :class:`~megatron.training.step.GradNormMeter` registered before this hook (its
            norm can overflow to ``inf`` for huge finite gradients), or None.
    """

    def __init__(self, meter: Any = None) -> None:
        self.meter = meter
        self.dropped = False

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = getattr(self.meter, "value", None)
        bad = norm is not None and not math.isfinite(norm)
        if not bad and grads:
            bad = not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        # on the parameters' device: NCCL reduces CUDA tensors only
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), None)
        flag = torch.tensor([float(bad)], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.dropped = bool(flag.item())
        if self.dropped:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None


class TrainGuard:
    """The guard as the trainer uses it: installs the filter, agrees the flags, logs.

    Args:
        training: the ``training`` config section.
        engine: the DeepSpeed engine (its ``skipped_steps`` counts updates DeepSpeed dropped).
        optimizer: the torch optimizer given to DeepSpeed.
        meter: the run's :class:`~megatron.training.step.GradNormMeter`, or None.
        nll_metric: the objective's per-token NLL metric key (``Objective.token_nll_metric``).
        vocab_size: ``model.vocab_size``.
        save_dir: ``checkpoint.save`` (where the last good checkpoint is looked up), or None.
    """

    def __init__(
        self,
        training: Any,
        engine: Any,
        optimizer: Any,
        meter: Any,
        nll_metric: str | None,
        vocab_size: int,
        save_dir: str | None,
    ) -> None:
        self.engine, self.nll_metric, self.save_dir = engine, nll_metric, save_dir
        self.loss_scaled = bool(engine.fp16_enabled())
        self.filter: NonFiniteUpdateFilter | None = None
        if not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled()):
            # the plain torch optimizer: DeepSpeed would apply a non-finite update here
            self.filter = NonFiniteUpdateFilter(meter)
            optimizer.register_step_pre_hook(self.filter)
        uniform = math.log(vocab_size) if nll_metric else None
        self.logic = DivergenceGuard(
            training.on_nonfinite,
            training.max_consecutive_skips,
            training.collapse_steps,
            uniform,
        )
        self.report_skips = training.on_nonfinite == "skip_step"
        self._ds_skipped = self._engine_skipped()

    def _engine_skipped(self) -> int:
        return int(getattr(self.engine, "skipped_steps", 0) or 0)

    @property
    def finite(self) -> bool:
        """Whether the last step's loss and gradient norm were finite (saved with a checkpoint)."""
        return self.logic.last_finite

    def check(self, step: int, values: dict[str, float]) -> DivergenceError | None:
        """Judge the step just run (collective: every rank calls it after every step).

        Adds ``skipped_steps`` to ``values`` under ``skip_step``, logs the warnings on rank 0.

        Returns:
            The :class:`DivergenceError` to raise before anything else happens at this step, or
            None.
        """
        loss, grad_norm = values.get("loss"), values.get("grad_norm")
        ds_skipped = self._engine_skipped()
        dropped = ds_skipped > self._ds_skipped or bool(self.filter and self.filter.dropped)
        self._ds_skipped = ds_skipped
        local = [not _finite(loss), not self.loss_scaled and not _finite(grad_norm), dropped]
        # on the engine's device: NCCL reduces CUDA tensors only
        flags = torch.tensor([float(x) for x in local], device=self.engine.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        agreed = StepFlags(*(bool(x) for x in flags.tolist()))
        last = None
        if agreed.loss_bad or agreed.grad_bad:
            last = self._last_good_checkpoint()
        nll = values.get(self.nll_metric) if self.nll_metric else None
        error, warnings = self.logic.observe(step, agreed, loss, grad_norm, nll, last)
        for line in warnings:
            log_rank0("%s", line, level=logging.WARNING)
        if self.report_skips:
            values["skipped_steps"] = float(self.logic.skipped)
        return error

    def _last_good_checkpoint(self) -> str | None:
        if not self.save_dir:
            return None
        found = newest_finite_checkpoint(Path(self.save_dir))
        return str(found) if found is not None else None
