"""Evaluation: perplexity (torch only) and an adapter for EleutherAI's lm-evaluation-harness.

Both score text the same way: a token sequence is cut into windows of at most ``max_seq_len``
model inputs, every token after the first is predicted exactly once, and the log-probabilities
come from ``model.hidden_states`` projected to logits only at the scored positions (never the
fp32 logits of a whole batch of windows).

lm-eval is an optional extra (``pip install 'tune-train[eval]'``) and is imported only by
:func:`lm_eval_model` and :func:`evaluate`.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tqdm.auto import tqdm

from tune_models import Decoder, generate_stream
from tune_train.errors import EvalError

if TYPE_CHECKING:
    import lm_eval.api.model

# Logits are formed for at most this many scored positions at once (fp32, ~128 MiB at a
# 32000-token vocabulary): the memory of scoring stays flat however long the batch.
_LOGIT_ELEMENTS = 2**25


class Tokenizer(Protocol):
    """What evaluation needs of a tokenizer (every tune_data tokenizer has it)."""

    bos_id: int | None  # None where the family has none (Qwen2)
    eos_id: int
    stop_tokens: tuple[int, ...]  # EOS and the family's end-of-turn tokens

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Window:
    """Model input ``tokens[:-1]`` predicting ``tokens[1:]``, of which the last ``n_scored``
    predictions count."""

    tokens: list[int]
    n_scored: int


def rolling_windows(ids: Sequence[int], max_seq_len: int, stride: int) -> list[Window]:
    """Cut a token sequence into windows that predict every token after the first once.

    Each window scores ``stride`` new tokens (the last one fewer) and gives them as much
    preceding context as fits: a window is at most ``max_seq_len`` model inputs. With
    ``stride == max_seq_len`` the windows do not overlap (cheapest); a smaller stride gives
    every prediction at least ``max_seq_len - stride`` tokens of context.

    Args:
        ids: Token ids; the first one (usually BOS) is only ever context.
        max_seq_len: Longest model input.
        stride: Tokens scored per window, 1 <= stride <= max_seq_len.

    Returns:
        The windows, in order.

    Raises:
        ValueError: If stride is not within [1, max_seq_len].
    """
    if not 1 <= stride <= max_seq_len:
        raise ValueError(f"stride must be within [1, max_seq_len={max_seq_len}], got {stride}")
    windows = []
    for first in range(1, len(ids), stride):  # first target index scored by this window
        end = min(first + stride, len(ids))  # targets first .. end-1
        start = max(0, end - 1 - max_seq_len)  # inputs start .. end-2: at most max_seq_len
        windows.append(Window(list(ids[start:end]), end - first))
    return windows


def check_batch_size(batch_size: int) -> None:
    """Raise ValueError unless batch_size is a whole number >= 1.

    Raises:
        ValueError: Naming the value.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size}")


def check_max_seq_len(max_seq_len: int, longest: int | None = None) -> None:
    """Raise ValueError unless max_seq_len is a whole number in [1, longest].

    Args:
        max_seq_len: The window length asked for.
        longest: The model's max_seq_len, when known.

    Raises:
        ValueError: Naming the value (and the model's limit).
    """
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a whole number >= 1, got {max_seq_len}")
    if longest is not None and max_seq_len > longest:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's max_seq_len {longest}")


def resolve_max_seq_len(model: Decoder, max_seq_len: int | None) -> int:
    """The window length to evaluate with: as given, or the model's when None.

    Raises:
        ValueError: If it is below 1 or longer than the model's max_seq_len.
    """
    if max_seq_len is None:
        return model.config.max_seq_len
    check_max_seq_len(max_seq_len, model.config.max_seq_len)
    return max_seq_len


def check_limit(limit: float | None) -> None:
    """Raise ValueError unless limit is None, a whole number >= 1 or a fraction in (0, 1).

    Raises:
        ValueError: Naming the value.
    """
    if limit is None:
        return
    if not (math.isfinite(limit) and limit > 0 and (limit < 1 or float(limit).is_integer())):
        raise ValueError(f"limit must be a number of documents (a whole number >= 1) or a "
                         f"fraction of them between 0 and 1, got {limit}")


@torch.no_grad()
def score_windows(
    model: Decoder, windows: Sequence[Window], batch_size: int = 8, progress: bool = False
) -> list[tuple[float, bool]]:
    """Log-probability of each window's scored tokens, and whether greedy decoding gives them.

    Windows are batched longest first and right-padded (causal attention: padding after a
    sequence cannot change it).

    Args:
        model: The model to score with.
        windows: What to score (see :class:`Window`).
        batch_size: Windows per forward pass.
        progress: Show a progress bar.

    Returns:
        (sum of log-probabilities in nats, every scored token is the argmax) per window.

    Raises:
        ValueError: If batch_size is below 1.
    """
    check_batch_size(batch_size)
    results: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
    device = model.output.weight.device
    order = sorted(
        (i for i, w in enumerate(windows) if w.n_scored > 0),
        key=lambda i: len(windows[i].tokens), reverse=True,
    )
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
        chosen = order[start : start + batch_size]
        width = len(windows[chosen[0]].tokens) - 1
        inputs = torch.zeros(len(chosen), width, dtype=torch.long)
        rows, cols, targets = [], [], []
        for row, i in enumerate(chosen):
            tokens, n = windows[i].tokens, windows[i].n_scored
            inputs[row, : len(tokens) - 1] = torch.as_tensor(tokens[:-1])
            # Input position p predicts tokens[p + 1]; the last n predictions are scored.
            rows += [row] * n
            cols += range(len(tokens) - 1 - n, len(tokens) - 1)
            targets += tokens[-n:]
        hidden = model.hidden_states(inputs.to(device))  # (B, T, D)
        picked = hidden[torch.tensor(rows), torch.tensor(cols)]  # (N, D)
        targets_t = torch.tensor(targets, device=device)  # (N,)
        token_logp, greedy = [], []
        chunk = max(1, _LOGIT_ELEMENTS // model.config.vocab_size)
        for c in range(0, len(targets), chunk):
            logits = model.logits(picked[c : c + chunk]).float()  # (C, V), soft-capped
            y = targets_t[c : c + chunk]
            token_logp.append(logits.log_softmax(-1).gather(1, y[:, None]).squeeze(1))
            greedy.append(logits.argmax(-1) == y)
        token_logp_all = torch.cat(token_logp).double().cpu()
        greedy_all = torch.cat(greedy).cpu()
        offset = 0
        for i in chosen:
            n = windows[i].n_scored
            results[i] = (
                token_logp_all[offset : offset + n].sum().item(),
                bool(greedy_all[offset : offset + n].all()),
            )
            offset += n
    return results


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over some text.

    Attributes:
        perplexity: exp(nll).
        nll: Mean negative log-likelihood per scored token, in nats.
        num_tokens: Number of tokens scored.
    """

    perplexity: float
    nll: float
    num_tokens: int


def perplexity(
    model: Decoder,
    tokenizer: Tokenizer | None,
    data: str | Sequence[int] | Sequence[str],
    max_seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of the model on a text, a list of documents, or token ids; no lm-eval needed.

    Text is encoded after BOS (EOS for a family without BOS: :func:`prefix_token`), so every
    text token is scored; given token ids, every id after the first is scored. Each document
    is scored on its own (no context crosses documents), and the result is the
    token-weighted mean over all of them. Long documents are scored in windows (see
    :func:`rolling_windows`).

    Args:
        model: The model to evaluate (evaluation mode, any device).
        tokenizer: Encodes text; may be None when ``data`` is token ids.
        data: One text (e.g. a whole file), a list of texts (e.g. a dataset column), or
            token ids.
        max_seq_len: Longest model input; default the model's max_seq_len.
        stride: Tokens scored per window; default max_seq_len (non-overlapping windows).
            Smaller gives each prediction more context at more compute.
        batch_size: Windows per forward pass.
        progress: Show a progress bar.

    Returns:
        The perplexity, the mean NLL and the number of tokens scored.

    Raises:
        ValueError: If there is nothing to score, text comes without a tokenizer, or
            max_seq_len / stride / batch_size do not fit the model.
    """
    max_seq_len = resolve_max_seq_len(model, max_seq_len)
    check_batch_size(batch_size)
    stride = max_seq_len if stride is None else stride
    if isinstance(data, str):
        documents: list[Sequence[int]] = [_encode(tokenizer, data)]
    elif len(data) > 0 and all(isinstance(d, str) for d in data):
        documents = [_encode(tokenizer, d) for d in data]
    else:
        documents = [[int(t) for t in data]]  # token ids (a list or a tensor)
    windows = [w for ids in documents for w in rolling_windows(ids, max_seq_len, stride)]
    num_tokens = sum(w.n_scored for w in windows)
    if num_tokens == 0:
        raise ValueError("nothing to score: the text must have at least one token")
    was_training = model.training
    model.eval()
    try:
        scores = score_windows(model, windows, batch_size, progress)
    finally:
        model.train(was_training)
    nll = -sum(logp for logp, _ in scores) / num_tokens
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, num_tokens=num_tokens)


def read_text(path: str | Path) -> str:
    """A text file's contents, for :func:`perplexity`.

    Raises:
        EvalError: If the file is empty, binary, or not UTF-8 text (the message says which
            and names the file).
    """
    path = Path(path)
    data = path.read_bytes()
    if not data:
        raise EvalError(f"{path} is empty: there is no text to score")
    if b"\0" in data:
        raise EvalError(f"{path} is a binary file, not text: perplexity is measured on UTF-8 "
                        "text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}): "
                        "convert it first, e.g. iconv -f latin1 -t utf-8") from None


def _encode(tokenizer: Tokenizer | None, text: str) -> list[int]:
    if tokenizer is None:
        raise ValueError("text needs a tokenizer: pass one, or give token ids instead")
    return [prefix_token(tokenizer), *tokenizer.encode(text, add_bos=False)]


def prefix_token(tokenizer: Tokenizer) -> int:
    """The token a scored text follows, so that its first token is scored too: BOS, or EOS
    for a family without BOS (Qwen2), as lm-eval's Hugging Face models do."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


class TuneEvalModel:
    """The lm-eval ``LM`` interface over a tune_models.Decoder and a tokenizer.

    This class holds the logic and needs no lm-eval; :func:`lm_eval_model` returns an instance
    that is also an ``lm_eval.api.model.LM`` (what ``lm_eval.simple_evaluate`` accepts).

    Args:
        model: The model (evaluation mode is set; weights are not changed).
        tokenizer: Encodes and decodes text (see :class:`Tokenizer`).
        batch_size: Sequences per forward pass.
        max_seq_len: Longest model input; default the model's max_seq_len. Longer contexts
            are truncated on the left.
        max_gen_toks: Default most new tokens for ``generate_until``.
    """

    def __init__(
        self,
        model: Decoder,
        tokenizer: Tokenizer,
        batch_size: int = 8,
        max_seq_len: int | None = None,
        max_gen_toks: int = 256,
    ):
        super().__init__()  # lm_eval's LM.__init__ when mixed in by lm_eval_model()
        check_batch_size(batch_size)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_seq_len = resolve_max_seq_len(model, max_seq_len)
        self.max_gen_toks = max_gen_toks

    def _hook(self, method: str, args: tuple, result: Any) -> None:
        # lm-eval's response cache (use_cache=...) listens here; absent outside lm-eval.
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(method, args, result)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # SentencePiece merges a space into the following word ("▁Paris"), so trailing spaces
        # of the context belong to the continuation, and the continuation's tokens are what
        # the joined text has beyond the context's tokens.
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:
            return [prefix_token(self.tokenizer)], self.tokenizer.encode(continuation,
                                                                         add_bos=False)
        whole = self.tokenizer.encode(context + continuation, add_bos=True)
        context_ids = self.tokenizer.encode(context, add_bos=True)
        return context_ids, whole[len(context_ids) :]

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context, and whether it is greedy.

        Args:
            requests: lm-eval Instances whose ``args`` are (context, continuation).

        Returns:
            (log-probability in nats, continuation is the greedy decoding) per request.

        Raises:
            ValueError: If a continuation alone is longer than max_seq_len tokens.
        """
        windows = []
        for request in requests:
            context_ids, continuation_ids = self._encode_pair(*request.args)
            if len(continuation_ids) > self.max_seq_len:
                raise ValueError(
                    f"a continuation of {len(continuation_ids)} tokens does not fit "
                    f"max_seq_len {self.max_seq_len}"
                )
            # Keep the last max_seq_len inputs: long contexts lose their beginning.
            tokens = (context_ids + continuation_ids)[-(self.max_seq_len + 1) :]
            windows.append(Window(tokens, len(continuation_ids)))
        results = score_windows(self.model, windows, self.batch_size, progress=True)
        for request, result in zip(requests, results):
            self._hook("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Log-probability of each whole text (after :func:`prefix_token`), in
        non-overlapping windows.

        Args:
            requests: lm-eval Instances whose ``args`` are (text,).

        Returns:
            The summed log-probability of every token of each text, in nats.
        """
        windows, owner = [], []
        for i, request in enumerate(requests):
            ids = _encode(self.tokenizer, request.args[0])
            for window in rolling_windows(ids, self.max_seq_len, self.max_seq_len):
                windows.append(window)
                owner.append(i)
        scores = score_windows(self.model, windows, self.batch_size, progress=True)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for request, total in zip(requests, totals):
            self._hook("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Continue each context until a stop string, a stop token (EOS, end of turn), or
        max_gen_toks new tokens.

        Args:
            requests: lm-eval Instances whose ``args`` are (context, generation kwargs):
                ``until`` (str or list of str), ``max_gen_toks``, ``do_sample``,
                ``temperature``, ``top_k``, ``top_p``.

        Returns:
            The generated text of each request, cut before its first stop string.
        """
        outputs: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampling = _sampling_kwargs(kwargs)
            prompt_room = self.max_seq_len - max_new
            if prompt_room < 1:
                raise ValueError(
                    f"max_gen_toks {max_new} leaves no room for a prompt in max_seq_len "
                    f"{self.max_seq_len}"
                )
            prompts = {
                i: self.tokenizer.encode(requests[i].args[0], add_bos=True)[-prompt_room:]
                for i in indices
            }
            order = sorted(indices, key=lambda i: len(prompts[i]), reverse=True)
            for start in tqdm(range(0, len(order), self.batch_size), desc="generating"):
                chosen = order[start : start + self.batch_size]
                texts = self._generate_batch([prompts[i] for i in chosen], max_new, until,
                                             sampling)
                for i, text in zip(chosen, texts):
                    outputs[i] = text
                    self._hook("generate_until", requests[i].args, text)
        return outputs

    def _generate_batch(
        self, prompts: list[list[int]], max_new: int, until: list[str], sampling: dict
    ) -> list[str]:
        new_tokens: list[list[int]] = [[] for _ in prompts]
        stream = generate_stream(
            self.model, prompts, max_new, stop_tokens=self.tokenizer.stop_tokens, **sampling
        )
        for step, tokens in enumerate(stream, start=1):
            for row, token in enumerate(tokens):
                if token is not None:
                    new_tokens[row].append(token)
            # Stop strings are text, not tokens: look at the text now and then, and stop the
            # whole batch once every row has one.
            if until and step % 16 == 0 and all(
                any(s in self.tokenizer.decode(ids) for s in until) for ids in new_tokens
            ):
                stream.close()
                break
        texts = []
        for ids in new_tokens:
            if ids and ids[-1] in self.tokenizer.stop_tokens:
                ids = ids[:-1]
            text = self.tokenizer.decode(ids)
            for s in until:
                text = text.split(s, 1)[0]
            texts.append(text)
        return texts

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in its results."""
        params = sum(p.numel() for p in self.model.parameters())
        return {"model_num_parameters": params, "model_dtype": str(self.model.output.weight.dtype)}


def _sampling_kwargs(kwargs: dict) -> dict:
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    if not do_sample or temperature == 0.0:
        return {"temperature": 0.0}
    return {
        "temperature": temperature,
        "top_k": kwargs.get("top_k"),
        "top_p": kwargs.get("top_p"),
        "seed": kwargs.get("seed"),
    }


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.api.model
    except ImportError as error:
        raise ImportError(
            "lm-eval is not installed; install the eval extra: pip install 'tune-train[eval]'"
        ) from error
    return lm_eval


@functools.cache
def _lm_class() -> type:
    lm_eval = _import_lm_eval()
    # TuneEvalModel first: its methods implement LM's abstract ones, and its __init__'s
    # super().__init__() runs LM.__init__ (rank, world size, cache hook).
    return type("TuneLM", (TuneEvalModel, lm_eval.api.model.LM), {"__module__": __name__})


def lm_eval_model(
    model: Decoder,
    tokenizer: Tokenizer,
    batch_size: int = 8,
    max_seq_len: int | None = None,
    max_gen_toks: int = 256,
) -> lm_eval.api.model.LM:
    """An lm-eval ``LM`` over our model, for ``lm_eval.simple_evaluate(model=...)``.

    Args: as :class:`TuneEvalModel`.

    Returns:
        A TuneEvalModel that is also an ``lm_eval.api.model.LM``.

    Raises:
        ImportError: If lm-eval is not installed (the message says how to install it).
    """
    return _lm_class()(model, tokenizer, batch_size, max_seq_len, max_gen_toks)


def evaluate(
    model: Decoder,
    tokenizer: Tokenizer,
    tasks: Iterable[str],
    *,
    include_path: str | None = None,
    include_defaults: bool = True,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_seq_len: int | None = None,
    max_gen_toks: int = 256,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:
    """Run lm-eval harness tasks on the model (what ``tune eval`` calls).

    Args:
        model: The model to evaluate.
        tokenizer: Its tokenizer.
        tasks: lm-eval task or group names (built-in ones, or ones defined in include_path).
        include_path: A folder of task YAML files to add (local tasks work offline).
        include_defaults: Also index lm-eval's built-in tasks (takes ~10 s); False when
            every task comes from include_path.
        num_fewshot: Few-shot examples per prompt; None uses each task's default.
        limit: Evaluate only this many documents per task (or this fraction, if < 1).
        batch_size: Sequences per forward pass.
        max_seq_len: Longest model input; default the model's max_seq_len.
        max_gen_toks: Default most new tokens for generation tasks.
        log_samples: Keep every document's prompt and response in the results ("samples").
        bootstrap_iters: Resamples for the standard errors of non-mean metrics (0: none).

    Returns:
        lm-eval's results dict: ``results[task][metric]`` (e.g. ``"acc,none"``), plus
        ``configs``, ``versions`` and more; ``lm_eval.utils.make_table(results)`` renders it.

    Raises:
        ImportError: If lm-eval is not installed.
        EvalError: If a task is not known to lm-eval (nor in include_path).
        ValueError: If batch_size, max_seq_len, limit or num_fewshot make no sense.
    """
    check_limit(limit)
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    lm_eval = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    for name in tasks:
        _check_task(manager, name, include_path, include_defaults)
    lm = lm_eval_model(model, tokenizer, batch_size, max_seq_len, max_gen_toks)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
        task_manager=manager, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
    )


def _check_task(manager: Any, name: str, include_path: str | None, include_defaults: bool) -> None:
    # A task, group or tag name (glob patterns too), or the path of a task YAML.
    if manager.match_tasks([name]) or Path(name).is_file():
        return
    close = difflib.get_close_matches(name, manager.all_tasks, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if not include_defaults:
        shown = ", ".join(manager.all_tasks[:10]) or "none"
        more = ", ..." if len(manager.all_tasks) > 10 else ""
        raise EvalError(f"no lm-eval task '{name}' in {include_path}{hint}; the tasks "
                        f"there: {shown}{more}")
    raise EvalError(f"unknown lm-eval task '{name}'{hint}; `lm-eval ls tasks` lists "
                    "lm-eval's own tasks")
