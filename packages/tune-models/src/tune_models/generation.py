"""Batched autoregressive decoding with a static KV cache (torch only).

Prompts of different lengths share one batch through left padding: row ``b`` holds its prompt
in the last ``len(prompt_b)`` slots of the prompt block, and a boolean mask hides the pad slots
from every query. All rows share the same cache slots and positions, so a left-padded row sees
its tokens at positions shifted by its padding; RoPE only depends on the *difference* of two
positions, so the shift changes nothing but rounding. The cache holds exactly the longest
prompt plus ``max_new_tokens`` slots and its shapes never change during decoding, which is what
lets ``compile=True`` turn the one-token step into a single static graph (CUDA graphs on GPU).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from tune_models.decoder import Decoder, softcap

# How often (in steps) generate() asks whether every row has stopped. Asking is a
# device-to-host sync; doing it every step would stall a GPU pipeline for nothing.
_STOP_CHECK_EVERY = 8


def check_sampling(
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None
) -> None:
    """Refuse sampling settings that would give junk instead of text.

    Args: as in :func:`sample_token`.

    Raises:
        ValueError: Naming the first setting that is out of range: temperature must be a
            finite number >= 0, top_k a whole number >= 1, top_p a number in (0, 1].
    """
    # Written so that NaN fails every test: each comparison with NaN is False.
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                         f"{temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k must be a whole number >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1] (1 keeps every token), got {top_p}")


def sample_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token of every row from its logits.

    Args:
        logits: (B, V) next-token logits.
        temperature: 0 picks the most likely token (greedy); otherwise the logits are divided
            by it before sampling.
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only among the most likely tokens whose probabilities add up to top_p
            (nucleus sampling); the most likely token is always kept.
        generator: Random source for sampling; None uses torch's global one.

    Returns:
        (B,) int64 token ids.

    Raises:
        ValueError: For a sampling setting out of range (see :func:`check_sampling`).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
        # Drop a token when the more likely tokens before it already reach top_p.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability
    # p_i / sum(p). Same distribution as torch.multinomial, without its host sync.
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def _logits(model: Decoder, hidden: torch.Tensor) -> torch.Tensor:
    """(B, D) final hidden states -> (B, V) logits (soft-capped as ``model.logits`` caps)."""
    if hidden.device.type != "cpu":
        return model.logits(hidden)
    # On CPU, MKL computes (V, D) @ (D, B) 2-4x faster than the same product as
    # (B, D) @ (D, V) (F.linear's order), and a single column falls into its slow
    # matrix-vector path, so a lone row is paired with itself. For llama2_20m's 32000 x 256
    # output matrix on 2 cores: 1.6 ms instead of 4.6 ms at batch 1, 3.8 instead of 8.5 at 8.
    weight = model.output.weight  # (V, D)
    if hidden.shape[0] == 1:
        logits = (weight @ hidden.repeat(2, 1).t())[:, :1].t()  # (1, V)
    else:
        logits = (weight @ hidden.t()).t()  # (B, V)
    return softcap(logits, model.config.final_logit_softcap)


def _decode_step(
    model: Decoder, token: torch.Tensor, pos: torch.Tensor, pad_start: torch.Tensor
) -> torch.Tensor:
    """One token per row at cache slot pos (1,); returns (B, V) logits. Static shapes only."""
    cache_len = model.layers[0].attention.kv_cache.max_seq_len
    slots = torch.arange(cache_len, device=token.device)  # (S,)
    mask = (slots <= pos) & (slots >= pad_start[:, None])  # (B, S): seen so far, not padding
    hidden = model.hidden_states(token, input_pos=pos, mask=mask[:, None, :])  # (B, 1, D)
    return _logits(model, hidden[:, -1])  # (B, V)


_compiled_steps: dict[str, object] = {}


def _compiled_decode_step(device: torch.device):
    # CUDA graphs ("reduce-overhead") remove the per-kernel launch cost that dominates
    # batch-1 decoding on GPU; on CPU there is nothing to graph, so plain inductor.
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _compiled_steps:
        _compiled_steps[mode] = torch.compile(
            _decode_step, mode=mode, fullgraph=True, dynamic=False
        )
    return _compiled_steps[mode]


def _stop_tensor(stop_tokens: int | Sequence[int] | None, device) -> torch.Tensor | None:
    if stop_tokens is None:
        return None
    ids = [stop_tokens] if isinstance(stop_tokens, int) else list(stop_tokens)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _check_request(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    if not prompts:
        raise ValueError("no prompts given: pass a list of token-id lists")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. the BOS id)")
    vocab = model.config.vocab_size
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"prompt {i} has token id {bad[0]} outside the model's vocabulary "
                f"[0, {vocab}): was it encoded with this model's tokenizer?"
            )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = max(len(p) for p in prompts) + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"longest prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens "
            f"({max_new_tokens}) = {total} exceeds the model's max_seq_len "
            f"({model.config.max_seq_len}): shorten the prompt or ask for fewer tokens"
        )
    check_sampling(temperature, top_k, top_p)


def _reusable_cache(model: Decoder, batch_size: int, length: int) -> bool:
    """True when the caller set up a cache this request fits in (then it is kept after)."""
    if not model.caches_are_enabled:
        return False
    cache = model.layers[0].attention.kv_cache
    return cache.k.shape[0] == batch_size and cache.max_seq_len >= length


@torch.no_grad()
def _decode(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    stop_tokens: int | Sequence[int] | None,
    compile: bool,
    check_every: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished-before (B,) bool) per step, on the model's device."""
    _check_request(model, prompts, max_new_tokens, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return
    device = model.output.weight.device
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(batch, prompt_len, dtype=torch.long)  # id 0 in pad slots: masked
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
    tokens = tokens.to(device)
    pad_start = torch.tensor(
        [prompt_len - len(p) for p in prompts], dtype=torch.long, device=device
    )  # (B,) first real slot of each row
    stops = _stop_tensor(stop_tokens, device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    keep_cache = _reusable_cache(model, batch, prompt_len + max_new_tokens)
    if not keep_cache:
        model.setup_caches(batch, prompt_len + max_new_tokens)
    step = _compiled_decode_step(device) if compile else _decode_step
    try:
        cache_len = model.layers[0].attention.kv_cache.max_seq_len
        slots = torch.arange(cache_len, device=device)  # (S,)
        pos = slots[:prompt_len]  # (T,)
        # Causal over slots and blind to padding. Pad queries may see themselves: a query
        # with no visible key makes SDPA return NaN, which would reach the cache.
        mask = (slots <= pos[:, None]) & (
            (slots >= pad_start[:, None, None]) | (slots == pos[:, None])
        )  # (B, T, S)
        hidden = model.hidden_states(tokens, input_pos=pos, mask=mask)
        logits = _logits(model, hidden[:, -1])  # (B, V): only the last position is needed
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        next_pos = torch.tensor([prompt_len], dtype=torch.long, device=device)
        for i in range(max_new_tokens):
            token = sample_token(logits, temperature, top_k, top_p, generator)
            token = token.masked_fill(done, 0)
            yield token, done.clone()
            if stops is not None:
                done = done | torch.isin(token, stops)
            last = i + 1 == max_new_tokens
            if last or (stops is not None and (i + 1) % check_every == 0 and bool(done.all())):
                break
            if compile and device.type == "cuda":
                # The previous step's outputs live in CUDA-graph memory; say we are done
                # with them so the next replay may overwrite them.
                torch.compiler.cudagraph_mark_step_begin()
            logits = step(model, token[:, None], next_pos, pad_start)
            next_pos += 1
    finally:
        if not keep_cache:
            model.clear_caches()


def generate_stream(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_tokens: int | Sequence[int] | None = None,
    compile: bool = False,
) -> Iterator[list[int | None]]:
    """Like :func:`generate`, but yield each step's new tokens as soon as they exist.

    Each item has one entry per prompt: the new token id, or None for a row that already
    stopped. A row's stop token is yielded (then None follows). Breaking out of the loop early
    is fine: the KV cache is released when the iterator is closed.

    Args and Raises: as in :func:`generate`.

    Yields:
        One list of len(prompts) entries per decoding step.
    """
    steps = _decode(
        model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens,
        compile, check_every=1,
    )
    try:
        for token, finished in steps:
            yield [None if f else t for t, f in zip(token.tolist(), finished.tolist())]
    finally:
        steps.close()


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_tokens: int | Sequence[int] | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Continue every prompt by up to max_new_tokens tokens, all prompts in one batch.

    The KV cache is sized to the longest prompt plus max_new_tokens and released afterwards.
    If the caller already set one up (``model.setup_caches(len(prompts), n)`` with
    n >= longest prompt + max_new_tokens), it is used and kept: that way repeated compiled
    calls reuse one graph instead of recompiling for every new cache size.

    Args:
        model: A Decoder of any family (any device and dtype); its weights are not changed.
        prompts: Token ids of each prompt (BOS included if the model expects one); lengths
            may differ.
        max_new_tokens: Most tokens to add to each prompt.
        temperature: 0 is greedy decoding (the argmax of the model's logits at every step);
            otherwise the sampling temperature.
        top_k: Sample among the k most likely tokens only (top_k=1 is greedy).
        top_p: Nucleus sampling: sample among the most likely tokens whose probabilities add
            up to top_p.
        seed: Makes sampling reproducible (a private generator; the global RNG is untouched).
            None draws from torch's global generator.
        stop_tokens: A token id (e.g. ``tokenizer.eos_id``) or ids that end a row. The stop
            token is the last one returned for that row; other rows continue.
        compile: torch.compile the one-token decode step (CUDA graphs on GPU). The first
            call compiles, which takes a while; worth it for long generations on GPU.

    Returns:
        The new tokens of each prompt (not the prompt itself), in the order of prompts.

    Raises:
        ValueError: For an empty prompt, a token id outside the vocabulary, a prompt plus
            max_new_tokens longer than the model's max_seq_len, or bad sampling settings.
    """
    steps = list(
        _decode(
            model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens,
            compile, check_every=_STOP_CHECK_EVERY,
        )
    )
    if not steps:
        return [[] for _ in prompts]
    tokens = torch.stack([t for t, _ in steps], dim=1).tolist()  # (B, N)
    finished = torch.stack([f for _, f in steps], dim=1).tolist()  # (B, N)
    # A row's tokens end where it was already finished before the step.
    return [[t for t, f in zip(row, fin) if not f] for row, fin in zip(tokens, finished)]
