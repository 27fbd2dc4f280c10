"""Objective registry: the only place that maps objective names to code.

An objective is a class registered under a name with :func:`register_objective`. It declares

* ``Config``: a ``@dataclass(kw_only=True)`` of its own hyper-parameters (the ``objective:`` YAML
  section minus ``name``), each field documented by a docstring right under it;
* ``batch_kind``: the kind of batch it consumes (``"sequence"``, ``"pair"``, ``"unpaired"``,
  ``"prompt"``);
* ``needs_reference_model``: whether reference log-probs must be provided;
* ``check_config(run_config) -> list[str]``: cross-section constraints, as messages of the form
  ``"dotted.path: message"`` (checked when the config loads, before any rank starts);
* ``loss(policy, reference, batch) -> (loss, metrics)``: pure tensor math. A metric is a 0-d
  tensor (averaged over micro-batches and data-parallel ranks with equal weight) or a
  ``(sum, count)`` pair of 0-d tensors (summed over them, then divided: a mean over examples that
  not every micro-batch has, e.g. KTO's desirable ones; left out of a step that has none), a
  ``(total,)`` 1-tuple (summed over micro-batches and ranks: a count over the whole step), or a
  :class:`Max` / :class:`Min` (the extreme over micro-batches and ranks, e.g. TRL's
  ``clip_ratio/high_max``).

Optional parts of the contract:

* ``token_nll_metric``: the key of the metric holding the per-token NLL of the targets, for
  objectives whose loss is one (``lm``, ``sft``); the trainer's collapse warning compares it with
  ``ln(vocab_size)``, the uniform distribution's (:mod:`megatron.training.guards`). Default None.
* ``model_head``: ``"lm"`` (per-token log-probs of the targets) or ``"value"`` (a scalar per
  token from the model's ``value_head``: reward models); the run's ``model.head`` must match.
* ``collate_options(pipeline) -> dict``: keyword arguments for the
  :class:`~megatron.data.collators.Collator` (e.g. whether unpaired batches carry KL sequences);
  ``pipeline`` tells whether the run is pipeline-parallel.
* ``model_outputs``: the per-token outputs the loss reads from the model (names in
  :mod:`megatron.model.output`); the model is built to give exactly these. Default: the head's
  (``token_logps`` + ``log_z`` for ``lm``, ``values`` for ``value``); WPO adds
  ``log_sum_sq_probs``.
* ``side_batches``: names of sub-batches (``batch.sub_batches[name]``) that the step forwards
  *without gradient* through the policy (``policy[name]`` = the model's output dict) and the
  reference model (``reference_log_probs(token_logps, batch, side={name: output})``); KTO's KL
  sequences. Ignored where the batch has no such sub-batch.
* Extra targets (``Batch.extra_targets``: prefix-shared rows score a completion's first token at
  the prompt's last hidden state): the model returns their log-probs as ``extra_logps [k]`` (and
  ``extra_log_sum_sq_probs [k]`` with ``log_sum_sq_probs``); ``loss`` reads them from ``policy``
  and ``reference_log_probs`` gets them as ``extra_logps``. The pair objectives count them; an
  objective whose batches cannot have them refuses such a batch with a clear error.
* ``data_warnings(dataset) -> list[str]``: advice about the training data, logged at start-up
  (KTO's desirable/undesirable balance).
* ``dp_means(policy, reference, batch) -> {name: (sum, count)}``: batch statistics the loss
  needs averaged over the data-parallel group (KTO's KL reference point).
  :func:`loss_with_dp_means` all-reduces the sums and counts and hands the means to ``loss`` as
  ``batch.dp_means``; a
  loss called without them (a single process, unit tests) uses the local ``sum / count``.

Trainer and step code ask the registry for the class and never compare names (STYLE.md rule 5).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from megatron.data.batch import Batch
from megatron.model.output import DEFAULT_OUTPUTS


@dataclasses.dataclass(frozen=True)
class Max:
    """A metric reduced by its maximum over micro-batches and data-parallel ranks."""

    value: Any


@dataclasses.dataclass(frozen=True)
class Min:
    """A metric reduced by its minimum over micro-batches and data-parallel ranks."""

    value: Any


# Every built-in objective is here before any other module can use the registry: importing
# this module runs megatron/objectives/__init__.py first, and it imports each built-in.
_REGISTRY: dict[str, type[Objective]] = {}


class Objective:
    """Base class of registered objectives (see module docstring for the contract)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    batch_kind: ClassVar[str] = "sequence"
    needs_reference_model: ClassVar[bool] = False
    model_head: ClassVar[str] = "lm"
    token_nll_metric: ClassVar[str | None] = None
    console_metrics: ClassVar[tuple[str, ...] | None] = None
    """``fnmatch`` patterns of the metrics the console line shows (``None``: all of them);
    ``metrics.jsonl`` always holds every metric."""

    @property
    def model_outputs(self) -> frozenset[str]:
        """Per-token model outputs the loss reads (see the module docstring)."""
        return DEFAULT_OUTPUTS[self.model_head]

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def check_config(cls, run_config: Any) -> list[str]:
        """Cross-section constraints on the whole run config; returns error messages."""
        return []

    def loss(self, policy: Any, reference: Any, batch: Any) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def reference_log_probs(
        self, token_logps: Any, batch: Any, *, extra_logps: Any = None
    ) -> dict[str, Any]:
        """The ``reference`` argument of :meth:`loss` from reference token log-probs ``[b, s]``
        (and ``extra_logps [k]``, those of the batch's extra targets, when it has any).

        Returns a dict of per-example tensors (first dimension = examples of the micro-batch, in
        batch order), which is also what a reference cache stores per example: the values must
        not depend on the batch's layout (padded, packed or prefix-shared), so that one cache
        serves every layout.
        """
        raise NotImplementedError(f"objective {self.name!r} does not use reference log-probs")

    def reference_cache_params(self) -> dict[str, Any]:
        """Settings of this objective that change :meth:`reference_log_probs` (cache key)."""
        return {}

    side_batches: tuple[str, ...] = ()
    """Sub-batch keys forwarded without gradient (see the module docstring)."""

    def collate_options(self, pipeline: bool = False) -> dict[str, Any]:
        """Keyword arguments of the :class:`~megatron.data.collators.Collator` this objective needs."""
        return {}

    def data_warnings(self, dataset: Any) -> list[str]:
        """Advice about the training data (logged as warnings when the run starts)."""
        return []

    def dp_means(self, policy: Any, reference: Any, batch: Any) -> dict[str, tuple[Any, Any]]:
        """``{name: (sum, count)}`` (0-d tensors) to average over the data-parallel group."""
        return {}


def loss_with_dp_means(
    objective: Objective,
    policy: Any,
    reference: Any,
    batch: Batch,
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[Any, dict[str, Any]]:
    """``objective.loss`` with its :meth:`Objective.dp_means` reduced over ``dp_group`` first.

    Every data-parallel rank calls this once per micro-batch, in the same order (the engines run
    the same number of micro-batches on each), so the all-reduce pairs up across ranks. The means
    are ``sum / max(count, 1)`` over all ranks' examples (detached) and reach the loss as
    ``batch.dp_means`` (on a copy of the batch).
    """
    stats = objective.dp_means(policy, reference, batch)
    if stats:
        names = sorted(stats)
        flat = torch.stack(
            [
                torch.stack([stats[k][0].detach().float(), stats[k][1].detach().float()])
                for k in names
            ]
        )  # [k, 2]: sum, count
        if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(flat, group=dp_group)
        batch = batch.replace(
            dp_means={k: flat[i, 0] / flat[i, 1].clamp(min=1.0) for i, k in enumerate(names)}
        )
    return objective.loss(policy, reference, batch)


def register_objective(name: str):
    """Class decorator registering an :class:`Objective` subclass under ``name``."""

    def wrap(cls: type[Objective]) -> type[Objective]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"objective {name!r} is registered twice")
        if not dataclasses.is_dataclass(cls.Config):
            raise TypeError(f"{cls.__name__}.Config must be a dataclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def objective_names() -> list[str]:
    """Names of all registered objectives, sorted."""
    return sorted(_REGISTRY)


def get_objective(name: str) -> type[Objective]:
    """The objective class registered as ``name``; ``KeyError`` listing the choices otherwise."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown objective {name!r}; choices: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
