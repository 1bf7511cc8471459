"""Beam-search bookkeeping with fixed shapes, following Hugging Face's vectorized beam search.

Per prompt there are ``K = num_beams`` running hypotheses and ``K`` finished ones. At each
step the best ``M = max(2, 1 + len(eos)) * K`` continuations over all running beams are
taken (so at least ``K`` of them did not just end); the best ``K`` that did not end keep
running, and those among the top ``K`` that ended (eos or the last step) compete with the
finished set on ``sum_logprobs / new_tokens**length_penalty``. ``early_stopping`` decides
when a prompt is done exactly as in ``transformers``: True stops once ``K`` hypotheses
finished; False stops when the best running beam, at its current length, can no longer
beat the worst finished one; "never" assumes the most favourable length.

Only pure array functions live here; the model call and the cache reordering are the
caller's (``source_beam`` says which running beam each new running beam continues).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Hugging Face's "impossible" score: added, not assigned, so arithmetic matches its output.
NEG_SCORE = -1.0e9


class BeamState(NamedTuple):
    """Shapes: ``B`` prompts, ``K`` beams, ``T`` max new tokens."""

    running_tokens: jax.Array     # [B, K, T] int32, new tokens only (the prompt is shared)
    running_scores: jax.Array     # [B, K] fp32 sum of log-probabilities
    finished_tokens: jax.Array    # [B, K, T] int32
    finished_scores: jax.Array    # [B, K] fp32 length-penalized scores (best first)
    finished_lengths: jax.Array   # [B, K] int32 new tokens in each finished hypothesis
    is_finished: jax.Array        # [B, K] bool: slot holds a real finished hypothesis
    improvable: jax.Array         # [B] bool: a running beam may still beat the finished ones
    all_candidates_ended: jax.Array  # [] bool: every continuation of the last step ended


class BeamSettings(NamedTuple):
    """Static settings (hashable)."""

    num_beams: int
    max_new_tokens: int
    eos_token_id: tuple[int, ...] | None
    length_penalty: float
    early_stopping: bool | str
    fill_token_id: int  # token of unused positions

    @property
    def candidates(self) -> int:
        n_eos = len(self.eos_token_id) if self.eos_token_id else 0
        return max(2, 1 + n_eos) * self.num_beams

    def penalties(self) -> np.ndarray:
        """``[T]`` fp32 ``(n + 1) ** length_penalty``, computed in float64 then rounded, as torch does."""
        lengths = np.arange(1, self.max_new_tokens + 1, dtype=np.float64)
        return (lengths**self.length_penalty).astype(np.float32)


def init_beam_state(batch: int, settings: BeamSettings) -> BeamState:
    k, t = settings.num_beams, settings.max_new_tokens
    tokens = jnp.full((batch, k, t), settings.fill_token_id, jnp.int32)
    # Only beam 0 is live at first: the K beams start identical and must not pick the same tokens.
    running_scores = jnp.where(jnp.arange(k) == 0, 0.0, NEG_SCORE).astype(jnp.float32)
    return BeamState(
        running_tokens=tokens,
        running_scores=jnp.broadcast_to(running_scores, (batch, k)),
        finished_tokens=tokens,
        finished_scores=jnp.full((batch, k), NEG_SCORE, jnp.float32),
        finished_lengths=jnp.zeros((batch, k), jnp.int32),
        is_finished=jnp.zeros((batch, k), bool),
        improvable=jnp.ones((batch,), bool),
        all_candidates_ended=jnp.zeros((), bool),
    )


def _gather(values: jax.Array, index: jax.Array) -> jax.Array:
    """``values [B, N, ...]`` gathered along axis 1 by ``index [B, M]`` -> ``[B, M, ...]``."""
    index = index.reshape(index.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=1)


def beam_step(
    state: BeamState, log_probs: jax.Array, step: jax.Array, settings: BeamSettings,
    sample_key: jax.Array | None = None,
) -> tuple[BeamState, jax.Array]:
    """One step. ``log_probs [B, K, V]`` fp32 (processed), ``step`` = new-token index (0-based).

    ``sample_key``: draw the ``M`` continuations without replacement in proportion to
    their probabilities (Gumbel top-k) instead of taking the best (beam sampling).
    Returns the new state and ``source_beam [B, K]`` int32: the running beam each new
    running beam extends (reorder the KV cache with it).
    """
    batch, k, vocab = log_probs.shape
    m = settings.candidates
    total = (log_probs + state.running_scores[:, :, None]).reshape(batch, k * vocab)
    if sample_key is None:
        top_scores, top_index = jax.lax.top_k(total, m)
    else:
        perturbed = total + jax.random.gumbel(sample_key, total.shape, total.dtype)
        top_index = jax.lax.top_k(perturbed, m)[1]
        top_scores = jnp.take_along_axis(total, top_index, axis=1)
        order = jnp.argsort(-top_scores, axis=1, stable=True)
        top_scores = jnp.take_along_axis(top_scores, order, axis=1)
        top_index = jnp.take_along_axis(top_index, order, axis=1)
    source = top_index // vocab
    token = (top_index % vocab).astype(jnp.int32)
    candidate_tokens = _gather(state.running_tokens, source)
    candidate_tokens = jax.lax.dynamic_update_slice_in_dim(candidate_tokens, token[:, :, None], step, axis=2)

    ended = step + 1 >= settings.max_new_tokens
    if settings.eos_token_id is not None:
        ended = ended | jnp.isin(token, jnp.asarray(settings.eos_token_id))
    ended = jnp.broadcast_to(ended, token.shape)
    # Running beams: the best K continuations that did not end.
    running_candidates = top_scores + ended.astype(jnp.float32) * NEG_SCORE
    keep = jax.lax.top_k(running_candidates, k)[1]
    running_tokens = _gather(candidate_tokens, keep)
    running_scores = _gather(running_candidates, keep)
    source_beam = _gather(source, keep).astype(jnp.int32)

    # Finished hypotheses: only the top K candidates may enter, and only while the prompt is open.
    penalties = jnp.asarray(settings.penalties())
    just_finished = ended & (jnp.arange(m) < k)[None, :]
    scores = top_scores / penalties[step]
    if settings.early_stopping is True:
        full = jnp.all(state.is_finished, axis=1, keepdims=True)
        scores = scores + full.astype(jnp.float32) * NEG_SCORE
    scores = scores + (~state.improvable[:, None]).astype(jnp.float32) * NEG_SCORE
    scores = scores + (~just_finished).astype(jnp.float32) * NEG_SCORE
    merged_scores = jnp.concatenate([state.finished_scores, scores], axis=1)
    best = jax.lax.top_k(merged_scores, k)[1]
    lengths = jnp.full((batch, m), step + 1, jnp.int32)
    finished_tokens = _gather(jnp.concatenate([state.finished_tokens, candidate_tokens], axis=1), best)
    finished_scores = _gather(merged_scores, best)
    finished_lengths = _gather(jnp.concatenate([state.finished_lengths, lengths], axis=1), best)
    is_finished = _gather(jnp.concatenate([state.is_finished, just_finished], axis=1), best)

    # Can the best running beam still beat the worst finished hypothesis?
    if settings.early_stopping == "never" and settings.length_penalty > 0.0:
        best_penalty = penalties[-1]  # the longest possible hypothesis
    else:
        best_penalty = penalties[step]  # its current length
    best_running = running_scores[:, :1] / best_penalty
    worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), NEG_SCORE)
    improvable = state.improvable & jnp.any(best_running > worst_finished, axis=1)

    new_state = BeamState(
        running_tokens=running_tokens, running_scores=running_scores,
        finished_tokens=finished_tokens, finished_scores=finished_scores,
        finished_lengths=finished_lengths, is_finished=is_finished,
        improvable=improvable, all_candidates_ended=jnp.all(ended),
    )
    return new_state, source_beam


def beam_search_open(state: BeamState, settings: BeamSettings) -> jax.Array:
    """Scalar bool: whether another step can change the result (Hugging Face's stopping rule)."""
    open_ = jnp.any(state.improvable) & ~state.all_candidates_ended
    if settings.early_stopping is True:
        open_ = open_ & ~jnp.all(state.is_finished)
    return open_


def beam_results(state: BeamState, num_return_sequences: int) -> tuple[jax.Array, jax.Array]:
    """Best hypotheses first: tokens ``[B * R, T]`` int32 and their new-token counts ``[B * R]``."""
    tokens = state.finished_tokens[:, :num_return_sequences]
    lengths = state.finished_lengths[:, :num_return_sequences]
    return tokens.reshape(-1, tokens.shape[-1]), lengths.reshape(-1)
