"""Logit processors: pure functions on ``[..., vocab]`` fp32 scores, in Hugging Face's order.

``process_scores`` applies, as ``transformers`` does: repetition penalty, no-repeat-n-gram,
min-new-tokens (eos suppressed), then, only when sampling, temperature -> top-k -> top-p.
Filtered entries become ``-inf``, so ``softmax`` of the result is the distribution that is
sampled; greedy decoding picks ``greedy_tokens`` of it.

The two repetition processors read the sequence each row has so far, a :class:`TokenHistory`
with fixed shapes (the buffer is filled as decoding goes), so they run inside the jitted loop.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llmjax.generation.config import GenerationConfig

FILTERED = -jnp.inf


class TokenHistory(NamedTuple):
    """The tokens each row holds so far: what Hugging Face's processors see as ``input_ids``.

    ``tokens [N, S]`` int32: the prefix (decoder: the prompt as given, left padding included;
    T5: the decoder start token) then the new tokens; only the first ``length`` columns count.
    ``length []`` int32: prefix length plus new tokens so far (the same for every row).
    ``first [N]`` int32: the first column ``repetition_penalty`` counts (decoder: the first real
    prompt token, so left padding is skipped, as Hugging Face does; T5: 0).
    """

    tokens: jax.Array
    length: jax.Array
    first: jax.Array


def _token_mask(tokens: jax.Array, keep: jax.Array, vocab: int) -> jax.Array:
    """``[N, vocab]`` bool: which ids occur in ``tokens [N, W]`` where ``keep [N, W]`` holds."""
    rows = tokens.shape[0]
    index = jnp.where(keep, tokens, vocab)  # dropped entries land in a spare column, cut below
    mask = jnp.zeros((rows, vocab + 1), bool).at[jnp.arange(rows)[:, None], index].set(True)
    return mask[:, :vocab]


def penalize_repetitions(scores: jax.Array, history: TokenHistory, penalty: float) -> jax.Array:
    """Hugging Face's repetition penalty on ``scores [N, vocab]``: every id already in the sequence
    (from ``history.first`` on) has its score divided by ``penalty`` when positive, multiplied when
    negative, once however often it occurs."""
    columns = jnp.arange(history.tokens.shape[1])[None, :]
    counted = (columns >= history.first[:, None]) & (columns < history.length)
    seen = _token_mask(history.tokens, counted, scores.shape[-1])
    return jnp.where(seen, jnp.where(scores < 0, scores * penalty, scores / penalty), scores)


def ban_repeated_ngrams(scores: jax.Array, history: TokenHistory, ngram_size: int) -> jax.Array:
    """``-inf`` for every token that would complete an ``ngram_size``-gram already in the sequence.

    Compares every window of ``ngram_size - 1`` tokens in the buffer with the last ``ngram_size - 1``
    tokens; a window that matches and whose n-gram ends before the last token bans the token after
    it. ``scores [N, vocab]``; ``ngram_size >= 1`` (1 bans every token seen so far).
    """
    tokens, n = history.tokens, ngram_size
    windows = tokens.shape[1] - n + 1  # n-grams that fit in the buffer
    if windows <= 0:
        return scores
    # An n-gram counts once all its tokens are in: it starts at or before length - n.
    match = jnp.broadcast_to(jnp.arange(windows) <= history.length - n, (tokens.shape[0], windows))
    if n > 1:
        # Before n - 1 tokens exist no window is valid, so the clamped slice is never used.
        suffix = jax.lax.dynamic_slice_in_dim(tokens, history.length - (n - 1), n - 1, axis=1)
        for offset in range(n - 1):
            match = match & (tokens[:, offset:offset + windows] == suffix[:, offset:offset + 1])
    banned = _token_mask(tokens[:, n - 1:n - 1 + windows], match, scores.shape[-1])
    return jnp.where(banned, FILTERED, scores)


def suppress_tokens(scores: jax.Array, token_ids: tuple[int, ...], active: jax.Array | bool) -> jax.Array:
    """Set ``scores[..., token_ids]`` to ``-inf`` where ``active`` (a bool scalar) holds."""
    vocab = jnp.arange(scores.shape[-1])
    hit = jnp.isin(vocab, jnp.asarray(token_ids)) & active
    return jnp.where(hit, FILTERED, scores)


def apply_temperature(scores: jax.Array, temperature: float) -> jax.Array:
    return scores / temperature


def top_k_filter(scores: jax.Array, top_k: int, min_tokens_to_keep: int = 1) -> jax.Array:
    """Keep the ``max(top_k, min_tokens_to_keep)`` highest scores (ties with the last one kept too)."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth_best = jax.lax.top_k(scores, k)[0][..., -1:]
    return jnp.where(scores < kth_best, FILTERED, scores)


def top_p_filter(scores: jax.Array, top_p: float, min_tokens_to_keep: int = 1) -> jax.Array:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches ``top_p``.

    As in Hugging Face: sort ascending, drop the prefix whose cumulative probability is
    ``<= 1 - top_p``, always keep the ``min_tokens_to_keep`` most likely.
    """
    order = jnp.argsort(scores, axis=-1)
    ascending = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop_sorted = cumulative <= (1.0 - top_p)
    keep_last = jnp.arange(scores.shape[-1]) >= scores.shape[-1] - min_tokens_to_keep
    drop_sorted = drop_sorted & ~keep_last
    # Undo the sort: position i of the original holds entry inverse[i] of the sorted order.
    inverse = jnp.argsort(order, axis=-1)
    drop = jnp.take_along_axis(drop_sorted, inverse, axis=-1)
    return jnp.where(drop, FILTERED, scores)


def process_scores(
    scores: jax.Array, step: jax.Array | int, config: GenerationConfig, *, min_tokens_to_keep: int = 1,
    history: TokenHistory | None = None,
) -> jax.Array:
    """All processors of ``config`` for new-token index ``step`` (0 = first new token).

    ``scores [..., vocab]`` fp32: logits for greedy/sampling, log-probabilities for beam
    search (as in Hugging Face). ``min_tokens_to_keep`` is 1, or ``len(eos) + 1`` for
    beam sampling. ``history``: the rows' tokens so far (``scores`` then ``[N, vocab]``),
    needed only by ``repetition_penalty`` and ``no_repeat_ngram_size``.
    """
    if config.reads_history:
        if history is None:
            raise ValueError("process_scores: repetition_penalty and no_repeat_ngram_size need the token history")
        if config.repetition_penalty != 1.0:
            scores = penalize_repetitions(scores, history, config.repetition_penalty)
        if config.no_repeat_ngram_size > 0:
            scores = ban_repeated_ngrams(scores, history, config.no_repeat_ngram_size)
    if config.min_new_tokens > 0 and config.eos_token_id is not None:
        scores = suppress_tokens(scores, config.eos_token_id, step < config.min_new_tokens)
    if config.do_sample:
        if config.temperature != 1.0:
            scores = apply_temperature(scores, config.temperature)
        if config.top_k != 0:
            scores = top_k_filter(scores, config.top_k, min_tokens_to_keep)
        if config.top_p < 1.0:
            scores = top_p_filter(scores, config.top_p, min_tokens_to_keep)
    return scores


def greedy_tokens(scores: jax.Array) -> jax.Array:
    """``[..., vocab]`` -> int32 ``[...]``: the first index of the maximum, as ``argmax`` (and torch's).

    A max, then a min over the indices that reach it: two plain reductions that XLA on CPU
    vectorizes, several times faster over a 32k vocabulary than ``argmax``'s (value, index)
    pair reduction. NaN counts as +inf, so a NaN row still gives an index in range.
    """
    scores = jnp.where(jnp.isnan(scores), jnp.inf, scores)
    best = jnp.max(scores, axis=-1, keepdims=True)
    ids = jnp.arange(scores.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(scores == best, ids, scores.shape[-1]), axis=-1)
