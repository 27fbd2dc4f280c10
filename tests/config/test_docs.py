"""configs/README.md is generated from the field docstrings and must be current."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from megatron.config import SECTIONS, DataSource, ObjectiveSection, RopeScaling
from megatron.config.docs import field_docs, render_docs
from megatron.objectives.registry import get_objective, objective_names

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "configs" / "README.md"


def test_readme_is_current():
    assert README.read_text(encoding="utf-8") == render_docs(), (
        "configs/README.md is stale; run: python tools/gen_config_docs.py"
    )


def _documented_classes() -> list[type]:
    return [*SECTIONS.values(), RopeScaling, DataSource] + [
        get_objective(name).Config for name in objective_names()
    ]


@pytest.mark.parametrize("cls", _documented_classes(), ids=lambda cls: cls.__name__)
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"


def test_field_docs_reads_the_string_after_the_annotation():
    @dataclasses.dataclass
    class Example:
        a: int = 1
        """First field."""
        b: str = "x"
        c: float = 0.5
        """Third
        field, two lines."""

    assert field_docs(Example) == {"a": "First field.", "c": "Third\nfield, two lines."}


def test_docs_list_every_section_field_and_objective():
    text = render_docs()
    for name, cls in SECTIONS.items():
        assert f"## `{name}`" in text
        for f in dataclasses.fields(cls):
            if cls is ObjectiveSection and f.name == "params":
                continue
            assert f"| `{f.name}` |" in text, f"{name}.{f.name} missing from the docs"
    for name in objective_names():
        assert f"### Objective `{name}`" in text
        for f in dataclasses.fields(get_objective(name).Config):
            assert f"| `{f.name}` |" in text
    assert "| `kv_channels` | int | *derived* | Derived, do not set." in text
    assert "| `num_layers` | int | **required** |" in text
    assert "| `betas` | list of float | `[0.9, 0.95]` |" in text


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "gen_config_docs", ROOT / "tools" / "gen_config_docs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gen_config_docs_writes_and_checks(tmp_path, monkeypatch, capsys):
    tool = _load_tool()
    target = tmp_path / "configs" / "README.md"
    target.parent.mkdir()
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    monkeypatch.setattr(tool, "README", target)
    target.write_text("old\n")
    assert tool.main(["--check"]) == 1
    assert "run: python tools/gen_config_docs.py" in capsys.readouterr().out
    assert tool.main([]) == 0
    assert target.read_text() == render_docs()
    assert tool.main(["--check"]) == 0
