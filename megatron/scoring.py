"""Scoring rows with a reward model (the library behind ``tools/score.py``).

Rows (one JSON object each):

* ``{"messages": [...]}``: a conversation, rendered with the chat template. When it ends with an
  assistant turn after at least one other message it is tokenized as a conversational
  ``pairwise`` row with ``prompt = messages[:-1]`` and ``chosen = messages[-1:]``; otherwise the
  whole rendered conversation is tokenized.
* ``{"prompt", "completion"}``: strings (EOS appended to the completion unless it ends with it)
  or message lists, tokenized as a ``pairwise`` row's ``prompt + chosen``.

Both reuse :func:`megatron.data.formats.boundaries.split_prompt_completions` and
:func:`megatron.data.formats.base.fit_prompt` with whole-text tokenization, so a scored sequence
has exactly the tokens ``tools/preprocess_data.py --format pairwise`` gives the same row (the
piecewise tokenization of preprocessing is verified equal to it, or turned off). ``max_length``:
a longer row is an error, or with ``truncate`` its prompt is cut from the left (never its last
turn or completion), as ``--length-policy truncate_prompt`` does.

A sequence's score is the value head at its last token, as the ``reward`` objective trains it
(``objective.score_token: last``). Two model sources give the same scores (to float rounding):

* :class:`NativeRewardModel`: a native ``model.head: value`` checkpoint (any TP size, any ZeRO
  stage: resharded to TP = 1 on load), run as one :class:`~megatron.model.gpt.GPTModel`.
* :class:`HFRewardModel`: an exported ``*ForSequenceClassification`` directory. The score head
  is applied to the base model's hidden state at each row's last real token (right padding plus
  attention mask), which is what transformers' own pooling (last token that is not
  ``pad_token_id``) gives whenever the pad id does not end a real sequence, and stays right when
  it does (e.g. a pad id equal to EOS).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron.ckpt import ConversionError
from megatron.ckpt.hf_config import is_sequence_classifier, model_config_from_section
from megatron.ckpt.layout import resolve_checkpoint
from megatron.ckpt.native import load_tp_shard, read_checkpoint_config
from megatron.data.formats import EncodeContext
from megatron.data.formats.base import fit_prompt, keys_hint
from megatron.data.formats.boundaries import split_prompt_completions
from megatron.data.formats.chat import check_messages
from megatron.data.formats.unpaired import read_example
from megatron.data.indexed import DatasetError
from megatron.data.options import PreprocessOptions
from megatron.data.sources import RowError
from megatron.model import GPTModel
from megatron.parallel import ParallelState
from megatron.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``--dtype`` choices of scoring."""


class ScoreError(ValueError):
    """Input scoring cannot use; the message names the file (and line) and the fix."""


class RowEncoder:
    """Tokenizes score rows exactly as pairwise training data (see the module docstring).

    Args:
        tokenizer: the reward model's tokenizer.
        chat_template: ``None`` (the tokenizer's), ``"none"`` or a Jinja file path.
        max_length: longest sequence; None: no limit.
        truncate: cut prompts from the left to fit ``max_length`` instead of failing.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None = None,
        max_length: int | None = None,
        truncate: bool = False,
    ) -> None:
        self.options = PreprocessOptions(
            data_format="pairwise",
            chat_template=chat_template,
            max_length=max_length,
            length_policy="truncate_prompt" if truncate else "error",
            split_special_tokens=False,  # whole-text tokenization: the reference
        )
        self.ctx = EncodeContext(tokenizer, self.options)

    def _prompt_completion(self, prompt: Any, completion: Any) -> list[int]:
        (split,) = split_prompt_completions([(prompt, [completion])], self.ctx)
        if isinstance(split, RowError):
            raise split
        (tokens,) = split.completions
        prompt_tokens, _ = fit_prompt(split.prompt, [len(tokens)], self.options)
        return prompt_tokens + tokens

    def _whole(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.ctx.renderer.render(messages)
        (tokens,) = self.ctx.pieces.encode_whole([text])
        limit = self.options.max_length
        if limit is not None and len(tokens) > limit:
            if self.options.length_policy == "error":
                raise RowError("too_long", f"{len(tokens)} tokens > --max-length {limit}")
            tokens = tokens[-limit:]
        return tokens

    def encode(self, record: Mapping[str, Any]) -> list[int]:
        """The token ids of one row.

        Raises:
            RowError: a malformed row, or one over ``max_length`` (without ``truncate``).
            DatasetError: conversational rows without a chat template.
        """
        if record.get("messages") is not None:
            messages = check_messages(record["messages"], "messages")
            if len(messages) > 1 and messages[-1]["role"] == "assistant":
                return self._prompt_completion(messages[:-1], messages[-1:])
            return self._whole(messages)
        if "prompt" in record or "completion" in record:
            prompt, completion, _ = read_example({**record, "label": True})
            return self._prompt_completion(prompt, completion)
        raise RowError(
            "missing_key",
            f"missing key 'messages' (or 'prompt' and 'completion'); keys present: "
            f"{keys_hint(record)}",
        )


def _pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [b, s] int64, lengths [b] int64)``, rows right-padded with ``pad_id``."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.int64)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return tokens, lengths


class NativeRewardModel:
    """A native ``model.head: value`` checkpoint as one TP = 1 :class:`GPTModel`.

    Args:
        ckpt: checkpoint directory (with ``latest``) or one of its ``iter_*`` directories.
        device: where to run.
        dtype: parameter and compute dtype.

    Raises:
        ScoreError: no checkpoint there, or not a reward model.
    """

    def __init__(self, ckpt: str | Path, device: str = "cpu", dtype: str = "fp32") -> None:
        try:
            root, self.config = read_checkpoint_config(ckpt)
            tag_dir = root / resolve_checkpoint(ckpt)[1]
            args = model_config_from_section(self.config.get("model") or {}, 1)
        except (ConversionError, ValueError) as e:
            raise ScoreError(f"{ckpt}: {e}") from e
        if args.head != "value":
            raise ScoreError(
                f"{tag_dir / 'config.yml'}: model.head is {args.head!r}; scoring needs a reward "
                "model (model.head: value, trained with objective.name: reward)"
            )
        self.root, self.tag_dir, self.vocab_size = root, tag_dir, args.vocab_size
        self.model = GPTModel(args, ParallelState.single())
        try:
            self.model.load_state_dict(load_tp_shard(tag_dir, args, 1, 0), strict=True)
        except ConversionError as e:
            raise ScoreError(str(e)) from e
        self.model.to(device=device, dtype=DTYPES[dtype]).eval()
        self.device = torch.device(device)

    def default_tokenizer(self) -> Path | None:
        """``data.tokenizer`` of the checkpoint's config, else its converted ``hf/``."""
        tokenizer = (self.config.get("data") or {}).get("tokenizer")
        if tokenizer and Path(tokenizer).is_dir():
            return Path(tokenizer)
        return self.root / "hf" if (self.root / "hf").is_dir() else None

    def score(self, rows: Sequence[Sequence[int]], pad_id: int) -> list[float]:
        """The value at each row's last token (fp32)."""
        return last_token_values(self.model, rows, pad_id, self.device)


@torch.no_grad()
def last_token_values(
    model: GPTModel, rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> list[float]:
    """A ``model.head: value`` model's value at each row's last token (fp32)."""
    tokens, lengths = _pad_right(rows, pad_id)
    tokens = tokens.to(device)
    # right padding: causal attention leaves every real position exact
    values = model(tokens, None, torch.zeros_like(tokens))["values"]  # [b, s]
    last = (lengths - 1).to(device)
    return values[torch.arange(len(rows), device=device), last].float().tolist()


class HFRewardModel:
    """An exported ``*ForSequenceClassification`` (``num_labels: 1``) directory.

    Args:
        hf_dir: the Hugging Face model directory.
        device: where to run.
        dtype: parameter and compute dtype.

    Raises:
        ScoreError: not a single-score sequence classifier.
    """

    def __init__(self, hf_dir: str | Path, device: str = "cpu", dtype: str = "fp32") -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        self.dir = Path(hf_dir)
        try:
            cfg = AutoConfig.from_pretrained(self.dir, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many types
            raise ScoreError(f"{self.dir / 'config.json'}: cannot load it ({e})") from e
        if not is_sequence_classifier(cfg) or cfg.num_labels != 1:
            raise ScoreError(
                f"{self.dir / 'config.json'}: architectures {cfg.architectures} with num_labels "
                f"{cfg.num_labels} is not a reward model (a *ForSequenceClassification with "
                "num_labels: 1); export a model.head: value checkpoint with "
                "tools/ckpts/convert_native_to_hf.py"
            )
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.dir, dtype=DTYPES[dtype], local_files_only=True
        )
        self.model.to(device).eval()
        self.vocab_size = int(cfg.vocab_size)
        self.device = torch.device(device)

    def default_tokenizer(self) -> Path:
        """The model directory itself."""
        return self.dir

    @torch.no_grad()
    def score(self, rows: Sequence[Sequence[int]], pad_id: int) -> list[float]:
        """``score(hidden)`` at each row's last real token (see the module docstring)."""
        tokens, lengths = _pad_right(rows, pad_id)
        mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
        hidden = self.model.base_model(
            input_ids=tokens.to(self.device), attention_mask=mask.long().to(self.device)
        ).last_hidden_state  # [b, s, h]
        last = hidden[torch.arange(len(rows), device=self.device), (lengths - 1).to(self.device)]
        return self.model.score(last).squeeze(-1).float().tolist()


def open_reward_model(
    path: str | Path, device: str = "cpu", dtype: str = "fp32"
) -> NativeRewardModel | HFRewardModel:
    """A reward model from an exported HF directory (``config.json``) or a native checkpoint
    (``latest``, or an ``iter_*`` directory with ``config.yml``).

    Raises:
        ScoreError: neither, or not a reward model.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return HFRewardModel(path, device, dtype)
    if (path / "latest").is_file() or (path / "config.yml").is_file():
        return NativeRewardModel(path, device, dtype)
    raise ScoreError(
        f"{path}: neither a Hugging Face model directory (config.json) nor a native checkpoint "
        "(latest, or an iter_* directory with config.yml)"
    )


def score_records(
    model: NativeRewardModel | HFRewardModel,
    encoder: RowEncoder,
    records: Sequence[tuple[str, Mapping[str, Any]]],
    batch_size: int = 8,
) -> list[float]:
    """Scores of ``(location, record)`` rows, in order.

    Every row is tokenized first (the first bad one fails the call), then rows are scored in
    batches of similar length.

    Raises:
        ScoreError: ``location: message`` of the first bad row.
    """
    rows = []
    for location, record in records:
        try:
            tokens = encoder.encode(record)
        except RowError as e:
            raise ScoreError(f"{location}: {e.message}") from None
        except DatasetError as e:
            raise ScoreError(f"{location}: {e}") from None
        if tokens and max(tokens) >= model.vocab_size:
            raise ScoreError(
                f"{location}: token id {max(tokens)} >= the model's vocab_size "
                f"{model.vocab_size}: the tokenizer does not belong to this model"
            )
        rows.append(tokens)
    pad_id = encoder.ctx.tokenizer.pad_id
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    scores = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for i, s in zip(batch, model.score([rows[i] for i in batch], pad_id), strict=True):
            scores[i] = s
    return scores
