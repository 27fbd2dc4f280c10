"""Project-wide rules: every module imports; objective names are compared only in the registry."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import megatron
from megatron.objectives import objective_names

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(megatron.__path__, prefix="megatron."))


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_objective_name_comparisons_outside_the_registry():
    """STYLE.md rule 5: trainer, step and data code never branch on an objective's name."""
    names = "|".join(re.escape(n) for n in objective_names())
    pattern = re.compile(
        rf"""(==|!=|\bin\b)\s*[\(\[{{]?\s*["']({names})["']|["']({names})["']\s*(==|!=)"""
        rf"""|objective\.name\s*(==|!=|\bin\b)"""
    )
    allowed = {ROOT / "megatron" / "objectives" / "registry.py"}
    offenders = []
    for path in [*ROOT.glob("megatron/**/*.py"), ROOT / "train.py", ROOT / "deepy.py"]:
        if path in allowed:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "objective names compared outside the registry:\n" + "\n".join(offenders)


def test_library_does_not_print_or_parse_arguments():
    """STYLE.md rule 1: no print(), argparse or YAML reading outside the config loader."""
    offenders = []
    for path in ROOT.glob("megatron/**/*.py"):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if re.search(r"^\s*print\(", text, re.M):
            offenders.append(f"{rel}: print()")
        if "argparse" in text:
            offenders.append(f"{rel}: argparse")
        if re.search(r"yaml\.(safe_)?load\(", text) and "megatron/config" not in str(rel):
            offenders.append(f"{rel}: reads YAML outside megatron/config")
    assert not offenders, "\n".join(offenders)


def test_model_and_parallel_code_is_device_agnostic():
    """STYLE.md rule 3: no `.cuda()` / `current_device()` in megatron/model or megatron/parallel."""
    bad = re.compile(r"\.cuda\(\)|cuda\.current_device\(\)")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for sub in ("model", "parallel")
        for p in (ROOT / "megatron" / sub).glob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if bad.search(line)
    ]
    assert not offenders, offenders
