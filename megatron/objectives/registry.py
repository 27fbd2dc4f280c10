"""Objective registry: the only place that maps objective names to code.

An objective is a class registered under a name with :func:`register_objective`. It declares

* ``Config``: a ``@dataclass(kw_only=True)`` of its own hyper-parameters (the ``objective:`` YAML
  section minus ``name``), each field documented by a docstring right under it;
* ``batch_kind``: the kind of batch it consumes (``"sequence"``, ``"pair"``, ``"unpaired"``,
  ``"prompt"``);
* ``needs_reference_model``: whether reference log-probs must be provided;
* ``check_config(run_config) -> list[str]``: cross-section constraints, as messages of the form
  ``"dotted.path: message"`` (checked when the config loads, before any rank starts);
* ``loss(policy, reference, batch) -> (loss, metrics)``: pure tensor math.

Trainer and step code ask the registry for the class and never compare names (STYLE.md rule 5).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

_REGISTRY: dict[str, type[Objective]] = {}


class Objective:
    """Base class of registered objectives (see module docstring for the contract)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    batch_kind: ClassVar[str] = "sequence"
    needs_reference_model: ClassVar[bool] = False
    policy_outputs: frozenset[str] = frozenset()
    """Extra per-token model outputs the loss reads (e.g. ``log_sum_sq_probs`` for WPO)."""

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def check_config(cls, run_config: Any) -> list[str]:
        """Cross-section constraints on the whole run config; returns error messages."""
        return []

    def loss(self, policy: Any, reference: Any, batch: Any) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def reference_log_probs(self, token_logps: Any, batch: Any) -> dict[str, Any]:
        """The ``reference`` argument of :meth:`loss` from reference token log-probs ``[b, s]``.

        Returns a dict of per-example tensors (first dimension = examples of the micro-batch, in
        batch order), which is also what a reference cache stores per example.
        """
        raise NotImplementedError(f"objective {self.name!r} does not use reference log-probs")

    def reference_cache_params(self) -> dict[str, Any]:
        """Settings of this objective that change :meth:`reference_log_probs` (cache key)."""
        return {}


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


def _load_builtin() -> None:
    # Importing the package registers every built-in objective.
    import megatron.objectives  # noqa: F401


def objective_names() -> list[str]:
    """Names of all registered objectives, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_objective(name: str) -> type[Objective]:
    """The objective class registered as ``name``; ``KeyError`` listing the choices otherwise."""
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown objective {name!r}; choices: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
