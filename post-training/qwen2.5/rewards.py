"""Rule-checked rewards for GRPO on GSM8K (post-training/qwen2.5/grpo_gsm8k.yml).

TRL's reward-function signature, so the same file works with TRL's ``GRPOTrainer``: ``answer`` is
the prompt row's column written by ``post-training/data/hf_to_jsonl.py --kind gsm8k``; a
conversational prompt's completion is ``[{"role": "assistant", "content": text}]``.

* ``accuracy``: 1.0 when the completion's final number equals the reference answer, else 0.0.
  The final number is the one after the last ``####`` (the format the prompt asks for), else in
  the last ``\\boxed{...}``, else the last number of the text; numbers compare as values
  (``72`` == ``72.0``, commas ignored).
* ``answer_format``: 1.0 when the completion ends with a ``#### <number>`` line, else 0.0 (a small
  weight teaches the answer format early).
"""

from __future__ import annotations

import re

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_FINAL = re.compile(rf"####\s*({_NUMBER})")
_BOXED = re.compile(rf"\\boxed\{{\s*({_NUMBER})\s*\}}")
_ANY = re.compile(_NUMBER)
_LAST_LINE = re.compile(rf"####\s*{_NUMBER}\s*$")


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: the assistant turn
        return "".join(m.get("content", "") for m in completion)
    return completion


def _value(number: str) -> float | None:
    try:
        return float(number.replace(",", "").replace("$", ""))
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The completion's final answer (see the module docstring), or None."""
    for pattern in (_FINAL, _BOXED, _ANY):
        found = pattern.findall(text)
        if found:
            return _value(found[-1])
    return None


def accuracy(prompts, completions, answer, **kwargs):
    out = []
    for completion, reference in zip(completions, answer, strict=True):
        got, want = final_number(_text(completion)), _value(str(reference))
        out.append(float(got is not None and want is not None and abs(got - want) < 1e-6))
    return out


def answer_format(prompts, completions, **kwargs):
    return [float(bool(_LAST_LINE.search(_text(c).strip()))) for c in completions]
