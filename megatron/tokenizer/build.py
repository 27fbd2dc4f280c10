"""Train a small byte-level BPE tokenizer and save it as a Hugging Face tokenizer directory.

Used for tests, demos and tiny runs where no pretrained tokenizer is available offline. The saved
directory holds ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` and
loads with ``transformers.AutoTokenizer.from_pretrained(out_dir)`` (and with
:func:`megatron.tokenizer.load_tokenizer`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
"""Special tokens in id order: ``<|endoftext|>`` is id 0, ``<|pad|>`` id 1, and so on."""

_NUM_BYTES = 256


def build_byte_level_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE on ``texts`` and save it as a ``PreTrainedTokenizerFast`` directory.

    The vocabulary is the 4 special tokens (ids 0-3, see ``SPECIAL_TOKENS``), the 256 byte symbols,
    then the learned merges, so any UTF-8 text round-trips through ``encode``/``decode``. No
    prefix space is added and no special token is inserted by ``encode``. The same ``texts`` and
    ``vocab_size`` give a byte-identical ``tokenizer.json``.

    Args:
        texts: Training corpus, one document per item. Consumed once.
        vocab_size: Total vocabulary size including special tokens and the 256 byte symbols; must
            be at least 260. The result may be smaller if the corpus has too few distinct pairs.
        out_dir: Directory to create (or overwrite files in).

    Returns:
        The output directory as a ``Path``.

    Raises:
        ValueError: If ``vocab_size`` cannot hold the special tokens and the byte alphabet.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = len(SPECIAL_TOKENS) + _NUM_BYTES
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size ({vocab_size}) must be at least {minimum} "
            f"({len(SPECIAL_TOKENS)} special tokens + {_NUM_BYTES} byte symbols)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=None,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    _write_portable_configs(out)
    logger.info("saved byte-level BPE (vocab %d) to %s", len(wrapped), out)
    return out


def _write_portable_configs(out: Path) -> None:
    """Rewrite the JSON configs so that transformers 4.x and 5.x both load the directory.

    transformers 5 saves ``tokenizer_class: TokenizersBackend`` (unknown to 4.x), lists the extra
    specials as ``extra_special_tokens`` (a dict in 4.x) and no longer writes
    ``special_tokens_map.json``; the keys below are read the same way by both.
    """
    special = {
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "unk_token": None,
        **special,
    }
    for name, payload in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        text = json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        (out / name).write_text(text, encoding="utf-8")
