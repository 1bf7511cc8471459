"""Logit processors: pure functions on ``[..., vocab]`` fp32 scores, in Hugging Face's order.

``process_scores`` applies, as ``transformers`` does: min-new-tokens (eos suppressed),
then, only when sampling, temperature -> top-k -> top-p. Filtered entries become
``-inf``, so ``softmax`` of the result is the distribution that is sampled; greedy
decoding picks ``greedy_tokens`` of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.generation.config import GenerationConfig

FILTERED = -jnp.inf


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
    scores: jax.Array, step: jax.Array | int, config: GenerationConfig, *, min_tokens_to_keep: int = 1
) -> jax.Array:
    """All processors of ``config`` for new-token index ``step`` (0 = first new token).

    ``scores [..., vocab]`` fp32: logits for greedy/sampling, log-probabilities for beam
    search (as in Hugging Face). ``min_tokens_to_keep`` is 1, or ``len(eos) + 1`` for
    beam sampling.
    """
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
