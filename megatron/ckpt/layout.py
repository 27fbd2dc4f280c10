"""Directory layout of a native checkpoint: the ``latest`` pointer and the ``iter_*`` tags.

::

    DIR/
      latest            # tag of the newest complete checkpoint (written last, atomically)
      iter_0000010/     # one tag directory per saved step

What a tag directory holds is described in :mod:`megatron.training.checkpointing` (a training
checkpoint) and :mod:`megatron.ckpt.native` (its model files). Both the trainer and the converters
find checkpoints through :func:`resolve_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

LATEST = "latest"
"""Name of the file holding the newest complete tag."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unusable; the message names the path and the fix."""


def tag_for(step: int) -> str:
    """Tag directory name of the checkpoint of ``step`` (``iter_0000010``)."""
    return f"iter_{step:07d}"


def resolve_checkpoint(load: str | Path) -> tuple[Path, str]:
    """``(checkpoint root, tag)`` from ``checkpoint.load`` (a run dir with ``latest``, or a tag dir).

    Raises:
        CheckpointError: nothing loadable there.
    """
    path = Path(load)
    if (path / LATEST).is_file():
        tag = (path / LATEST).read_text().strip()
        if not (path / tag).is_dir():
            raise CheckpointError(f"{path / LATEST} names {tag!r}, but {path / tag} does not exist")
        return path, tag
    if (path / "client_state.json").is_file():
        return path.parent, path.name
    if path.is_dir() and path.name.startswith("iter_"):
        raise CheckpointError(
            f"checkpoint.load: incomplete save: {path / 'client_state.json'} is missing (the save "
            "was interrupted); resume from an earlier iter_* or the directory's 'latest'"
        )
    if not path.exists():
        raise CheckpointError(
            f"checkpoint.load: {path} does not exist; give a directory written by checkpoint.save "
            "(it holds a 'latest' file) or one of its iter_* directories"
        )
    raise CheckpointError(
        f"checkpoint.load: {path} holds no 'latest' file and is not an iter_* checkpoint directory"
    )
