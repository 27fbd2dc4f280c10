"""Loading checkpoint files without running code from them (``torch.load(weights_only=True)``).

A ``.pt`` file is a pickle: loaded with ``weights_only=False`` it may call any function it names
(an object's ``__reduce__``), so a crafted checkpoint runs code. Every checkpoint file this
project reads goes through :func:`safe_load`, and every file DeepSpeed reads itself (resume,
``zero_to_fp32``) is first passed through :func:`check_loadable`: both accept only tensors, plain
Python data and the few harmless classes listed in :data:`ALLOWED_GLOBALS`, which DeepSpeed 0.19
stores in its files:

* ``deepspeed.runtime.zero.config.ZeroStageEnum`` (an ``int`` enum; ZeRO optimizer partitions),
* ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` / ``DynamicLossScaler`` (numbers only),
* ``deepspeed.utils.tensor_fragment.fragment_address`` (a dataclass of two ints),

and, for RNG files written before RNG states were stored as plain data, numpy's array
reconstruction (``numpy.ndarray``, ``numpy.dtype``, ``numpy._core.multiarray._reconstruct``).
Anything else is refused with :class:`UnsafeCheckpointError`, naming the file and the globals.
A truncated or otherwise unreadable file is a :class:`CheckpointError` naming the file and its size
(torch's own error does not name it).
"""

from __future__ import annotations

import importlib
import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from megatron.ckpt.layout import CheckpointError

DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""Classes DeepSpeed pickles into its model / optimizer files; plain data holders."""

NUMPY_GLOBALS = (
    "numpy.ndarray",
    "numpy.dtype",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
)
"""What an old-format RNG file (a pickled ``np.random.get_state()``) needs: numeric arrays."""

ALLOWED_GLOBALS = DEEPSPEED_GLOBALS + NUMPY_GLOBALS
"""Every non-torch global a checkpoint file may name."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file names code outside :data:`ALLOWED_GLOBALS`; it is not loaded."""


def _resolve(name: str) -> Any | None:
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _numpy_dtype_classes() -> list[type]:
    """numpy's numeric dtype classes (``UInt32DType`` ...): pickled arrays name them at BUILD
    time, so ``get_unsafe_globals_in_checkpoint`` does not list them."""
    import numpy as np

    kinds = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
    return [type(np.dtype(k)) for k in (*kinds, "float16", "float32", "float64")]


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    size = path.stat().st_size if path.is_file() else None
    what = f"{size} bytes" if size is not None else "missing"
    return CheckpointError(f"{path}: cannot be read ({what}; truncated or corrupt?): {e}")


def safe_load(path: str | Path, allowed: Iterable[str] = ALLOWED_GLOBALS, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)``, also accepting the globals in ``allowed``.

    The plain load is tried first; only a file that names one of ``allowed`` imports its module
    (DeepSpeed is imported only for DeepSpeed's own files).

    Args:
        path: the file.
        allowed: fully qualified names of the extra classes/functions the file may name.
        **kwargs: passed to ``torch.load`` (``map_location``, ``mmap``).

    Returns:
        The loaded object.

    Raises:
        UnsafeCheckpointError: the file names other code (listed in the message).
        CheckpointError: the file is missing, truncated or not a torch file.
    """
    path = Path(path)
    kwargs.setdefault("map_location", "cpu")
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as first:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (RuntimeError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            raise _unreadable(path, e) from first
        allowed = set(allowed)
        bad = sorted(set(names) - allowed)
        resolved = [_resolve(n) for n in names]
        if bad or any(obj is None for obj in resolved):
            shown = bad or sorted(n for n, o in zip(names, resolved, strict=True) if o is None)
            raise UnsafeCheckpointError(
                f"{path}: refused to load: it names code outside the allowed set ({shown}); "
                "a checkpoint holds tensors and plain data only, and loading this file could "
                "run arbitrary code"
            ) from first
        extra: list[Any] = list(zip(resolved, names, strict=True))
        if any(n.startswith("numpy.") for n in names):
            extra += _numpy_dtype_classes()
        with torch.serialization.safe_globals(extra):
            try:
                return torch.load(path, weights_only=True, **kwargs)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(f"{path}: refused to load: {e}") from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        if "mmap" in str(e) and kwargs.get("mmap"):
            # why: files in torch's legacy (non-zip) format cannot be memory-mapped
            return safe_load(path, allowed, **{**kwargs, "mmap": False})
        raise _unreadable(path, e) from e


def check_loadable(paths: Iterable[str | Path]) -> None:
    """Prove each file loads with :func:`safe_load` before a library (DeepSpeed) loads it unsafely.

    Files are memory-mapped, so the tensors' bytes are not read.

    Raises:
        UnsafeCheckpointError: a file names code outside the allowed set.
        CheckpointError: a file is truncated or unreadable.
    """
    for path in paths:
        safe_load(path, mmap=True)


def torch_files(tag_dir: str | Path) -> list[Path]:
    """Every ``*.pt`` file of a checkpoint's tag directory, sorted."""
    return sorted(p for p in Path(tag_dir).glob("*.pt") if p.is_file())
