"""Logit processors against hand-computed distributions and transformers' warpers; sampling frequencies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from llmjax.generation.config import GenerationConfig
from llmjax.generation.processors import (
    greedy_tokens, process_scores, suppress_tokens, top_k_filter, top_p_filter,
)

LOGITS = np.array([[2.0, 1.0, 0.5, 0.0, -1.0]], np.float32)
# softmax(LOGITS): e^2, e^1, e^.5, e^0, e^-1 = 7.3891, 2.7183, 1.6487, 1, 0.3679 over 13.1240
#                = 0.56302, 0.20712, 0.12563, 0.07620, 0.02803

# (settings, hand-computed filtered distribution)
CASES = {
    "temperature 0.5": (
        dict(temperature=0.5, top_k=0),
        # exp(2 * logits) = e^4, e^2, e^1, 1, e^-2 = 54.59815, 7.389056, 2.718282, 1, 0.135335
        # over 65.84082
        [0.829245, 0.112226, 0.041286, 0.015188, 0.002055]),
    "top_k 2": (
        dict(top_k=2),
        # e^2 / (e^2 + e), e / (e^2 + e)
        [0.731059, 0.268941, 0, 0, 0]),
    "top_p 0.8": (
        dict(top_k=0, top_p=0.8),
        # ascending cumulative 0.028, 0.104, 0.230 ...: the first two are <= 0.2 and go;
        # keep e^2, e, e^.5 over 11.7561
        [0.628531, 0.231224, 0.140244, 0, 0]),
    "temperature 2, top_k 4, top_p 0.7": (
        dict(temperature=2.0, top_k=4, top_p=0.7),
        # /2 -> 1, .5, .25, 0, -.5; top-4 drops -.5; softmax over four = .40870 .24789 .19306 .15035;
        # ascending cumulative .150 <= .3 goes, .343 stays;
        # keep e^1, e^.5, e^.25 = 2.718282, 1.648721, 1.284025 over 5.651028
        [0.481024, 0.291756, 0.227220, 0, 0]),
}


def _sampling(**kwargs) -> GenerationConfig:
    return GenerationConfig(do_sample=True, **kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_filtered_distribution_equals_hand_computed(name):
    settings, expected = CASES[name]
    scores = process_scores(jnp.asarray(LOGITS), 0, _sampling(**settings))
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(scores))[0], expected, atol=2e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_filtered_scores_equal_transformers_warpers(name):
    settings, _ = CASES[name]
    scores = torch.from_numpy(np.random.default_rng(1).normal(size=(4, 50)).astype(np.float32))
    reference = scores
    if settings.get("temperature", 1.0) != 1.0:
        reference = hf.TemperatureLogitsWarper(settings["temperature"])(None, reference)
    if settings.get("top_k", 50):
        reference = hf.TopKLogitsWarper(settings.get("top_k", 50))(None, reference)
    if settings.get("top_p", 1.0) < 1.0:
        reference = hf.TopPLogitsWarper(settings["top_p"])(None, reference)
    ours = process_scores(jnp.asarray(scores.numpy()), 0, _sampling(**settings))
    np.testing.assert_array_equal(np.isinf(np.asarray(ours)), np.isinf(reference.numpy()))
    np.testing.assert_allclose(np.asarray(ours), reference.numpy(), rtol=1e-6)


def test_greedy_ignores_sampling_filters():
    config = GenerationConfig(temperature=0.5, top_k=1, top_p=0.1)  # do_sample=False
    np.testing.assert_array_equal(np.asarray(process_scores(jnp.asarray(LOGITS), 0, config)), LOGITS)


def test_top_k_keeps_ties_and_min_tokens():
    scores = jnp.asarray([[3.0, 1.0, 3.0, 0.0]])
    assert np.isfinite(np.asarray(top_k_filter(scores, 1))).tolist() == [[True, False, True, False]]
    assert np.isfinite(np.asarray(top_k_filter(scores, 1, min_tokens_to_keep=3))).sum() == 3
    assert np.isfinite(np.asarray(top_k_filter(scores, 10))).all()  # k larger than the vocabulary


def test_top_p_always_keeps_min_tokens():
    scores = jnp.asarray(LOGITS)
    assert np.isfinite(np.asarray(top_p_filter(scores, 0.01))).tolist() == [[True, False, False, False, False]]
    assert np.isfinite(np.asarray(top_p_filter(scores, 0.01, min_tokens_to_keep=2))).sum() == 2
    assert np.isfinite(np.asarray(top_p_filter(scores, 1.0))).all()


def test_min_new_tokens_suppresses_every_eos_until_reached():
    config = GenerationConfig(min_new_tokens=2, eos_token_id=(0, 3))
    scores = jnp.asarray(LOGITS)
    for step in (0, 1):
        out = np.asarray(process_scores(scores, step, config))[0]
        assert np.isneginf(out[[0, 3]]).all() and np.isfinite(out[[1, 2, 4]]).all()
    np.testing.assert_array_equal(np.asarray(process_scores(scores, 2, config)), LOGITS)
    np.testing.assert_array_equal(np.asarray(suppress_tokens(scores, (1,), False)), LOGITS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_sampled_frequencies_match_the_filtered_distribution(name):
    """20,000 seeded draws; each frequency within 0.01 of its probability (> 5 standard deviations)."""
    settings, expected = CASES[name]
    config = _sampling(**settings)
    keys = jax.random.split(jax.random.key(1234), 20_000)

    @jax.jit
    def draw(keys):
        scores = process_scores(jnp.asarray(LOGITS[0]), 0, config)
        return jax.vmap(lambda k: jax.random.categorical(k, scores))(keys)

    samples = np.asarray(draw(keys))
    frequencies = np.bincount(samples, minlength=LOGITS.shape[1]) / samples.size
    assert np.abs(frequencies - np.asarray(expected)).max() < 0.01, frequencies
    assert (frequencies[np.asarray(expected) == 0] == 0).all()  # filtered tokens never drawn


def test_greedy_tokens_pick_the_first_maximum_like_torch_argmax():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(2, 32, 300)).astype(np.float32)  # many ties
    scores[0, 0, :] = -np.inf       # every token suppressed
    scores[0, 1, 7] = np.inf
    got = np.asarray(greedy_tokens(jnp.asarray(scores)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, torch.argmax(torch.from_numpy(scores), dim=-1).numpy())
