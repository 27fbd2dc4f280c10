"""Shared pieces of the tools tests: loading a CLI script as a module, a checkpoint's config."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import yaml

REPO = Path(__file__).resolve().parents[2]


def load_tool(path: str) -> ModuleType:
    """The script at ``REPO/path`` (e.g. ``tools/score.py``) imported as a module."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoint_config(ckpt: Path) -> dict:
    """The ``config.yml`` of a checkpoint's ``latest`` tag, as plain data."""
    tag = (ckpt / "latest").read_text().strip()
    return yaml.safe_load((ckpt / tag / "config.yml").read_text())
