"""Write configs/README.md from the config dataclasses' field docstrings.

Usage::

    python tools/gen_config_docs.py          # regenerate configs/README.md
    python tools/gen_config_docs.py --check  # exit 1 if configs/README.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "configs" / "README.md"
sys.path.insert(0, str(ROOT))

from megatron.config.docs import render_docs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render_docs()
    current = README.read_text(encoding="utf-8") if README.exists() else None
    if args.check:
        if current != text:
            print(f"{README.relative_to(ROOT)} is stale; run: python tools/gen_config_docs.py")
            return 1
        print(f"{README.relative_to(ROOT)} is up to date")
        return 0
    if current != text:
        README.write_text(text, encoding="utf-8")
        print(f"wrote {README.relative_to(ROOT)}")
    else:
        print(f"{README.relative_to(ROOT)} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
