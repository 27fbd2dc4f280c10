"""lm-evaluation-harness on the native, tensor-parallel model (no export, no Hugging Face model).

Shapes: b rows of a batch, s longest row, h hidden, n scored positions of a batch, v vocabulary
(``model.vocab_size``, gathered across TP).

:class:`ShardedLM` is an ``lm_eval.api.model.TemplateLM`` (lm-evaluation-harness 0.4.x,
Gao et al., https://github.com/EleutherAI/lm-evaluation-harness) over a
:class:`~megatron.model.gpt.GPTModel` whose weights are sharded over a tensor-parallel group, or
a DeepSpeed engine wrapping one (the live weights of a training run). It implements the three
request types so that they mean what lm-eval's own ``hf`` model (``HFLM``, read in 0.4.13) makes
them mean; the parity test compares the two request by request:

* ``loglikelihood``: lm-eval's ``TemplateLM`` tokenizes (context, continuation) pairs (trailing
  context spaces moved to the continuation; an empty context becomes the prefix token);
  ``_loglikelihood_tokens`` then runs ``(context + continuation)[-(L + 1):][:-1]`` (``L`` the
  model's ``max_position_embeddings``) and returns the summed log-probability of the
  continuation and whether every continuation token is the argmax (greedy).
* ``loglikelihood_rolling``: the document split into disjoint windows of at most ``L`` tokens
  (``lm_eval.utils.get_rolling_token_windows`` with the prefix token, context length 1), the
  windows' log-likelihoods summed.
* ``generate_until``: contexts left-truncated to ``L - max_gen_toks`` tokens, continued by the
  batched key/value-cache decoder (:func:`megatron.model.generate.generate`; greedy unless the
  task asks ``do_sample``) until EOS or ``max_gen_toks``; the text is cut at the first stop
  sequence (``until`` plus the EOS text), as ``HFLM`` does.

Tokenization is ``HFLM``'s: the Hugging Face tokenizer of the run, special tokens added as the
tokenizer adds them (``add_bos_token`` forces them on or off), none added to a string that
already starts with the prefix token's text. The prefix token is BOS, else EOS.

**Log-probabilities.** Rows are right-padded (a causal model's real positions do not see the
padding), the forward gives final hidden states, and only the scored positions are projected to
logits: ``hidden @ W^T`` on this TP rank's vocabulary shard, gathered across TP
(:meth:`GPTModel.logits`), a chunk of positions at a time, ``log_softmax`` in fp32 (fp64 for an fp64 model). That is the
computation ``HFLM`` does on the exported model's full logits, so per-request log-likelihoods agree
to fp32 round-off (the matrix products are summed in a different order).

**Data parallelism.** lm-eval sees one process (``rank`` 0, ``world_size`` 1) on every rank and
builds every request on every rank; each method gives data-parallel replica ``r`` of ``d`` the
requests ``r, r + d, r + 2d, ...`` (after sorting by length, so replicas get similar work), runs
them in batches, and all-gathers the results over the data-parallel group, so every rank returns
all results and computes the same metrics (rank 0 reports them). The tensor-parallel ranks of a
replica run the same batches (their forwards are collectives). Forwards differ in number between
replicas, so this is only for weights every replica holds whole (no ZeRO-3 partitioning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron.evaluation.errors import EvalError, require_lm_eval
from megatron.model.generate import SamplingConfig, generate
from megatron.parallel import ParallelState

logger = logging.getLogger(__name__)

LOGIT_CHUNK = 1024
"""Scored positions projected to full-vocabulary logits at a time (memory: ``LOGIT_CHUNK * v``)."""
DEFAULT_MAX_GEN_TOKS = 256
"""``max_gen_toks`` when a task does not set one (``HFLM``'s default)."""

TemplateLM = require_lm_eval().api.model.TemplateLM


def split_for_rank(n: int, lengths: Sequence[int], dp_rank: int, dp_size: int) -> list[int]:
    """Indices of the ``n`` items data-parallel replica ``dp_rank`` handles, longest first.

    Items are sorted by length (longest first, then index) and dealt round-robin, so the
    replicas get similar work and every item goes to exactly one replica.
    """
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    return order[dp_rank::dp_size]


def gather_results(local: dict[int, Any], n: int, group: dist.ProcessGroup | None) -> list[Any]:
    """Every replica's ``{index: result}`` merged into a list of ``n`` results (all ranks)."""
    parts = [local]
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, local, group=group)
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part)
    if len(merged) != n:
        raise RuntimeError(f"gathered {len(merged)} of {n} evaluation results")
    return [merged[i] for i in range(n)]


class ShardedLM(TemplateLM):
    """lm-eval's model interface over a TP-sharded :class:`GPTModel` (see the module docstring).

    Args:
        model: a ``model.head: lm`` :class:`GPTModel` (this rank's TP shard) or a DeepSpeed
            engine wrapping one; switched to eval mode while evaluating, restored afterwards.
        tokenizer: the run's Hugging Face tokenizer (``PreTrainedTokenizerBase``).
        state: the parallel state (``tp_group`` for the logits, ``dp_*`` for the split).
        batch_size: rows per forward (per data-parallel replica).
        add_bos_token: force special tokens on (True) or off (False) when encoding; ``None``:
            the tokenizer's own behaviour (``HFLM``'s default).
        max_gen_toks: generation budget when a task sets none.
        seed: sampling seed of ``do_sample`` tasks (offset by the data-parallel rank).
        on_generations: called with ``(contexts, generations)`` of each ``generate_until``
            call (all requests, every rank): the trainer logs a sample of them.
        progress: progress bars (rank 0) for the requests of each call.

    Raises:
        EvalError: a ``model.head: value`` model (it has no log-probabilities to give).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        state: ParallelState,
        *,
        batch_size: int = 8,
        add_bos_token: bool | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int = 1234,
        on_generations: Callable[[list[str], list[str]], None] | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.inner = getattr(model, "module", model)
        if getattr(self.inner.cfg, "head", "lm") == "value":
            raise EvalError(
                "a model.head: value checkpoint (a reward model) has no language-model head: it "
                "cannot generate or give log-likelihoods for lm-eval tasks; score it on pairs "
                "with tools/rewardbench.py"
            )
        if batch_size < 1:
            raise EvalError(f"batch size must be >= 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.state = state
        self.batch_size_per_rank = batch_size
        self.add_bos_token = add_bos_token
        self._max_gen_toks = max_gen_toks
        self.seed = seed
        self.on_generations = on_generations
        self.progress = progress
        self._device = self.inner.embedding.weight.device

    # ------------------------------------------------------------------ lm-eval's properties
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        """EOS ends generations and is the prefix token when the tokenizer has no BOS."""
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """BOS, else EOS (``HFLM``'s rule): the context of an empty-context request."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        """Longest row the model runs: ``model.max_position_embeddings``."""
        return int(self.inner.cfg.max_position_embeddings)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Token ids of ``string`` as ``HFLM.tok_encode`` makes them (see the module doc)."""
        from lm_eval.models.utils import has_bos_prefix

        special = {}
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        if add_special_tokens is None and has_bos_prefix(
            string, self.tokenizer.decode(self.prefix_token_id)
        ):
            special["add_special_tokens"] = False
        return list(self.tokenizer.encode(string, **special))

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ log-likelihoods
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        """``TemplateLM``'s tokenization (its bar off), then :meth:`_loglikelihood_tokens`."""
        return super().loglikelihood(requests, disable_tqdm=True)

    @torch.no_grad()
    def _score_batch(
        self, rows: list[tuple[list[int], list[int]]]
    ) -> list[tuple[list[float], list[bool]]]:
        """Per-token log-probs and greedy flags of each ``(inputs, targets)`` row's targets,
        the targets being the last ``len(targets)`` next-token predictions of ``inputs``."""
        width = max(len(inp) for inp, _ in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (inp, _) in enumerate(rows):
            tokens[i, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        hidden = self.model(tokens.to(self._device))  # [b, s, h]; causal: padding unseen
        rows_idx, cols_idx, targets = [], [], []
        for i, (inp, tgt) in enumerate(rows):
            start = len(inp) - len(tgt)
            rows_idx += [i] * len(tgt)
            cols_idx += range(start, len(inp))
            targets += tgt
        picked = hidden[
            torch.tensor(rows_idx, device=self._device), torch.tensor(cols_idx, device=self._device)
        ]  # [n, h]
        target = torch.tensor(targets, device=self._device)
        logps, greedy = [], []
        for start in range(0, picked.shape[0], LOGIT_CHUNK):
            logits = self.inner.logits(picked[start : start + LOGIT_CHUNK])  # [c, v]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp64 stays
            chunk_target = target[start : start + LOGIT_CHUNK]
            lp = logits.log_softmax(-1).gather(-1, chunk_target[:, None]).squeeze(-1)
            logps.append(lp)
            greedy.append(logits.argmax(-1) == chunk_target)
        flat_lp = torch.cat(logps).tolist()
        flat_greedy = torch.cat(greedy).tolist()
        out, pos = [], 0
        for _, tgt in rows:
            out.append((flat_lp[pos : pos + len(tgt)], flat_greedy[pos : pos + len(tgt)]))
            pos += len(tgt)
        return out

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation), all greedy)`` per ``(key, context, continuation)``."""
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise EvalError("a log-likelihood request needs a context and a continuation")
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            rows.append((whole[:-1], whole[-len(continuation) :]))
        mine = split_for_rank(
            len(rows), [len(r[0]) for r in rows], self.state.dp_rank, self.state.dp_size
        )
        local: dict[int, tuple[float, bool]] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            progress = _progress(len(mine), "log-likelihoods", not self.progress)
            for start in range(0, len(mine), self.batch_size_per_rank):
                batch = mine[start : start + self.batch_size_per_rank]
                scored = self._score_batch([rows[i] for i in batch])
                for i, (lp, greedy) in zip(batch, scored, strict=True):
                    local[i] = (float(sum(lp)), bool(all(greedy)))
                progress.update(len(batch))
            progress.close()
        finally:
            self.model.train(was_training)
        results = gather_results(local, len(rows), self.state.dp_group)
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents over disjoint windows (see the module doc)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            for window in get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append((None, *make_disjoint_window(window)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(
            owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True
        ):
            totals[i] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop sequence, EOS or ``max_gen_toks`` (module doc)."""
        from lm_eval.models.utils import (
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        outputs: list[str] = [""] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise EvalError(
                    f"a generation task asks max_gen_toks {max_gen} (lm-eval's default: 256) but "
                    f"the model's max_position_embeddings is {self.max_length}: set the task's "
                    "generation_kwargs.max_gen_toks lower"
                )
            sampling = SamplingConfig(
                max_new_tokens=max_gen,
                # do_sample without a temperature: transformers' generation default, 1.0
                temperature=float(kwargs.get("temperature", 1.0))
                if kwargs.get("do_sample")
                else 0.0,
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
            )
            contexts = [requests[i].args[0] for i in indices]
            prompts = [self.tok_encode(c)[-(self.max_length - max_gen) :] for c in contexts]
            texts = self._generate(prompts, sampling, until, disable_tqdm)
            for i, text in zip(indices, texts, strict=True):
                outputs[i] = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        if self.on_generations is not None:
            self.on_generations([r.args[0] for r in requests], outputs)
        return outputs

    def _stop_at(self, until: list[str]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``generate``'s ``stop``: a row is done once its decoded text holds a stop sequence
        (as ``HFLM``'s stopping criterion; the text is cut there afterwards)."""
        stops = [u for u in until if u]

        def stop(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            done = torch.zeros(tokens.shape[0], dtype=torch.bool)
            for i, (row, n) in enumerate(zip(tokens.tolist(), lengths.tolist(), strict=True)):
                text = self.tok_decode(row[:n])
                done[i] = any(s in text for s in stops)
            return done

        return stop

    def _generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        until: list[str],
        disable_tqdm: bool,
    ) -> list[str]:
        """Decoded continuations of ``prompts``, this replica's share generated here."""
        mine = split_for_rank(
            len(prompts), [len(p) for p in prompts], self.state.dp_rank, self.state.dp_size
        )
        local: dict[int, str] = {}
        progress = _progress(len(mine), "generations", not self.progress)
        for start in range(0, len(mine), self.batch_size_per_rank):
            batch = mine[start : start + self.batch_size_per_rank]
            out = generate(
                self.model,
                [prompts[i] for i in batch],
                sampling,
                eos_id=self.eot_token_id,
                seed=self.seed + self.state.dp_rank,
                stop=self._stop_at(until),
            )
            for i, ids in zip(batch, out.to_lists(), strict=True):
                local[i] = self.tok_decode(ids)
            progress.update(len(batch))
        progress.close()
        return gather_results(local, len(prompts), self.state.dp_group)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, disable: bool) -> Any:
    """A tqdm bar on the first rank only (stderr), else a no-op."""
    if disable or total == 0 or (dist.is_initialized() and dist.get_rank() != 0):
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False)
