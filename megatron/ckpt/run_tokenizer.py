"""The tokenizer a native -> Hugging Face export carries: the run's, with its chat template.

A native checkpoint stores no tokenizer. :func:`find_run_tokenizer` picks the one the run used,
first found:

1. an explicit directory (``--tokenizer DIR``);
2. the template directory (``--hf-template``, ``CKPT/hf``, ...) when it holds tokenizer files;
3. ``data.tokenizer`` of the checkpoint's ``config.yml`` when it is a tokenizer directory (a
   model trained from scratch: ``tokenizer.json`` and no ``config.json``);
4. ``tokenizer.name`` in ``PREFIX.meta.json`` of ``data.train[0].path``: the directory
   ``tools/preprocess_data.py`` tokenized with. Relative paths resolve against the current
   directory, as they did when the run and the preprocessing read them.

**Chat template.** Preprocessing records where the template came from and the sha256 of its text
(``chat_template: {"source": "tokenizer" | "none" | FILE, "sha256": ...}``), not the text, so
:func:`training_chat_template` can only *find* the text again: the carried tokenizer's own
template, the ``--chat-template FILE`` that preprocessing read, or the template of the data's
tokenizer directories, whichever hashes to the recorded sha256. A template that none of them
holds any more (a moved or edited file) cannot be recovered; it is reported with a warning
naming ``--chat-template FILE``. Data built with ``--chat-template none`` (or a tokenizer without
a template) records no template: there is nothing to add. :func:`write_chat_template` writes the
text both where transformers >= 4.50 (5.x included) reads it first, ``chat_template.jinja``, and
where older versions read it, ``tokenizer_config.json``'s ``chat_template``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.ckpt import ConversionError
from megatron.data.formats.chat import template_sha256
from megatron.data.indexed import DatasetError
from megatron.data.meta import read_meta
from megatron.utils import atomic_write_text

logger = logging.getLogger(__name__)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")
"""Files of which one makes a directory a Hugging Face tokenizer directory."""
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class RunTokenizer:
    """A tokenizer directory and how it was found (for messages)."""

    path: Path
    """The Hugging Face tokenizer directory."""
    source: str
    """Where it came from, e.g. ``data.tokenizer of config.yml``."""


def is_tokenizer_dir(path: str | Path | None) -> bool:
    """True when ``path`` is a directory holding ``tokenizer.json`` or ``tokenizer_config.json``."""
    return path is not None and any((Path(path) / f).is_file() for f in TOKENIZER_MARKERS)


def training_data_meta(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """``PREFIX.meta.json`` of the run's first training dataset (None: none or unreadable)."""
    train = (config.get("data") or {}).get("train") or []
    first = train[0] if isinstance(train, list) and train else None
    prefix = first.get("path") if isinstance(first, Mapping) else None
    if not prefix:
        return None
    try:
        return read_meta(prefix)
    except DatasetError as e:
        logger.info("no training data metadata: %s", e)
        return None


def find_run_tokenizer(
    config: Mapping[str, Any], template_dir: Path | None, given: str | Path | None
) -> RunTokenizer | None:
    """The tokenizer the run used (see the module docstring for the order); None: none found.

    Args:
        config: the checkpoint's ``config.yml`` as plain data.
        template_dir: the export's template directory, if any.
        given: an explicit tokenizer directory.

    Raises:
        ConversionError: ``given`` is not a tokenizer directory.
    """
    if given is not None:
        if not is_tokenizer_dir(given):
            raise ConversionError(
                f"--tokenizer {given}: not a tokenizer directory (it needs one of "
                f"{', '.join(TOKENIZER_MARKERS)})"
            )
        return RunTokenizer(Path(given), "--tokenizer")
    if is_tokenizer_dir(template_dir):
        return RunTokenizer(Path(template_dir), "the template directory")
    named = (config.get("data") or {}).get("tokenizer")
    if is_tokenizer_dir(named):
        return RunTokenizer(Path(named), "data.tokenizer of config.yml")
    meta = training_data_meta(config)
    recorded = ((meta or {}).get("tokenizer") or {}).get("name")
    if is_tokenizer_dir(recorded):
        return RunTokenizer(Path(recorded), "the training data's PREFIX.meta.json")
    return None


def tokenizer_chat_template(tokenizer_dir: Path | None) -> str | None:
    """The chat template transformers loads from ``tokenizer_dir`` (None: none).

    ``chat_template.jinja`` wins over ``tokenizer_config.json``'s ``chat_template``, as in
    transformers 5 (``PreTrainedTokenizerBase._from_pretrained``); a list of named templates
    yields its ``default`` one.
    """
    if tokenizer_dir is None:
        return None
    jinja = tokenizer_dir / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = tokenizer_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _read_text(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def training_chat_template(
    config: Mapping[str, Any], tokenizer_dir: Path | None, given: str | Path | None = None
) -> str | None:
    """The chat template to write into the exported tokenizer; None: nothing to add.

    Args:
        config: the checkpoint's ``config.yml`` as plain data (its training data's metadata
            records the template).
        tokenizer_dir: the tokenizer the export carries.
        given: a Jinja file to use in any case (``--chat-template FILE``).

    Raises:
        ConversionError: ``given`` cannot be read.
    """
    meta = training_data_meta(config)
    recorded = (meta or {}).get("chat_template") or {}
    want, source = recorded.get("sha256"), recorded.get("source")
    if given is not None:
        text = _read_text(given)
        if text is None:
            raise ConversionError(f"--chat-template {given}: cannot read it")
        if want and template_sha256(text) != want:
            logger.warning(
                "--chat-template %s differs from the template the training data was rendered "
                "with (source %s, sha256 %s)",
                given,
                source,
                want,
            )
        return text
    if not want:
        return None  # text data, --chat-template none, or a tokenizer without a template
    if template_sha256(tokenizer_chat_template(tokenizer_dir)) == want:
        return None  # the carried tokenizer has it already
    texts: list[tuple[str, str | None]] = []  # (where, text)
    if source not in (None, "tokenizer", "none"):
        texts.append((str(source), _read_text(source)))
    data_tokenizer = ((meta or {}).get("tokenizer") or {}).get("name")
    for name in (data_tokenizer, (config.get("data") or {}).get("tokenizer")):
        if is_tokenizer_dir(name):
            texts.append((str(name), tokenizer_chat_template(Path(name))))
    for candidate, text in texts:
        if text is not None and template_sha256(text) == want:
            logger.info("chat template of the training data: from %s", candidate)
            return text
    logger.warning(
        "the training data was rendered with the chat template from %s (sha256 %s), which the "
        "exported tokenizer does not carry; preprocessing records only its sha256 and no file "
        "with that hash was found, so the export keeps the tokenizer's own template (%s). Pass "
        "--chat-template FILE to write it",
        source,
        want,
        "none" if tokenizer_chat_template(tokenizer_dir) is None else "a different one",
    )
    return None


def write_chat_template(out_dir: Path, template: str) -> None:
    """Make ``template`` the chat template of the tokenizer in ``out_dir``.

    Writes ``chat_template.jinja`` (read first by transformers >= 4.50) and, when
    ``tokenizer_config.json`` exists, its ``chat_template`` key (read by older versions).
    """
    atomic_write_text(out_dir / CHAT_TEMPLATE_FILE, template)
    config_path = out_dir / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["chat_template"] = template
        text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        atomic_write_text(config_path, text)


def tokenizer_special_ids(tokenizer_dir: Path) -> dict[str, Any]:
    """``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` of a tokenizer (None: it has none).

    Raises:
        ConversionError: transformers cannot load the tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise ConversionError(
            f"{tokenizer_dir}: transformers cannot load this tokenizer ({e}); pass --tokenizer "
            "DIR with the run's tokenizer"
        ) from e
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def check_recorded_vocab(config: Mapping[str, Any], tokenizer_dir: Path) -> None:
    """Warn when ``tokenizer_dir``'s vocabulary is not the one the training data was built with."""
    recorded = ((training_data_meta(config) or {}).get("tokenizer") or {}).get("vocab_hash")
    if not recorded:
        return
    from megatron.tokenizer import TokenizerError, load_tokenizer

    try:
        actual = load_tokenizer(tokenizer_dir).vocab_hash()
    except TokenizerError:
        return  # tokenizer_special_ids reports it when it matters
    if actual != recorded:
        logger.warning(
            "%s: its vocabulary differs from the one the training data was tokenized with "
            "(vocab_hash %s, recorded %s): the export would decode ids into other tokens; pass "
            "--tokenizer DIR with the run's tokenizer",
            tokenizer_dir,
            actual[:12],
            recorded[:12],
        )
