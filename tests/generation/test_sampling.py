"""Sampling through ``generate``: seeded reproducibility, the distribution actually sampled, top_k=1 == greedy."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from llmjax.generate import generate
from tests.generation.models import prompts, small_model
from tests.stats import chi_square, chi_square_bound


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    family, torch_model, model, params = small_model("llama_gqa", 0, tmp_path_factory.mktemp("llama"))
    ids, mask = prompts(family, 4, [7, 4, 6], torch_model.config.vocab_size)
    return torch_model, model, params, ids, mask


def test_same_seed_same_output_other_seed_other_output(llama):
    _, model, params, ids, mask = llama
    settings = dict(max_new_tokens=8, do_sample=True, top_k=0)
    first = np.asarray(generate(model, params, ids, mask, rng=jax.random.key(7), **settings))
    again = np.asarray(generate(model, params, ids, mask, rng=jax.random.key(7), **settings))
    other = np.asarray(generate(model, params, ids, mask, rng=jax.random.key(8), **settings))
    np.testing.assert_array_equal(first, again)
    assert (first[:, 7:] != other[:, 7:]).any()
    np.testing.assert_array_equal(first[:, :7], ids)  # the prompt comes back unchanged


def test_top_k_1_sampling_is_greedy(llama):
    _, model, params, ids, mask = llama
    greedy = generate(model, params, ids, mask, max_new_tokens=8)
    sampled = generate(model, params, ids, mask, max_new_tokens=8, do_sample=True, top_k=1,
                       temperature=0.7, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(sampled), np.asarray(greedy))


def test_first_token_frequencies_match_the_processed_model_distribution(llama):
    """8192 samples for one prompt: each frequency within 0.025 of the probability (>= 4.5 std).

    Expected: the torch model's next-token logits through transformers' own temperature,
    top-k and top-p warpers, then softmax.
    """
    torch_model, model, params, ids, mask = llama
    settings = dict(temperature=1.5, top_k=20, top_p=0.9)
    draws = 8192
    out = generate(model, params, ids[:1], mask[:1], rng=jax.random.key(11), max_new_tokens=1,
                   do_sample=True, num_return_sequences=draws, **settings)
    out = np.asarray(out)
    assert out.shape == (draws, ids.shape[1] + 1)
    np.testing.assert_array_equal(out[:, :-1], np.repeat(ids[:1], draws, axis=0))

    with torch.inference_mode():
        logits = torch_model(input_ids=torch.from_numpy(ids[:1].astype(np.int64)),
                             attention_mask=torch.from_numpy(mask[:1].astype(np.int64))).logits[:, -1]
    for warper in (hf.TemperatureLogitsWarper(settings["temperature"]), hf.TopKLogitsWarper(settings["top_k"]),
                   hf.TopPLogitsWarper(settings["top_p"])):
        logits = warper(None, logits)
    expected = torch.softmax(logits, -1)[0].numpy()
    frequencies = np.bincount(out[:, -1], minlength=expected.size) / draws
    assert 2 < (expected > 0).sum() <= 20  # the filters bite but leave a real choice
    assert np.abs(frequencies - expected).max() < 0.025
    assert (frequencies[expected == 0] == 0).all()


def test_beam_sampling_is_seeded(llama):
    _, model, params, ids, mask = llama
    settings = dict(max_new_tokens=5, do_sample=True, num_beams=2, num_return_sequences=2)
    a = generate(model, params, ids, mask, rng=jax.random.key(5), **settings)
    b = generate(model, params, ids, mask, rng=jax.random.key(5), **settings)
    assert a.shape == (6, ids.shape[1] + 5)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _processed_probs(torch_model, ids, settings):
    """Next-token probabilities after ``ids`` ``[rows, length]`` (no padding): the torch model's logits through
    transformers' temperature and top-k warpers, then softmax. ``[rows, vocab]`` float64."""
    with torch.inference_mode():
        logits = torch_model(input_ids=torch.from_numpy(np.asarray(ids, np.int64))).logits[:, -1]
    logits = hf.TemperatureLogitsWarper(settings["temperature"])(None, logits)
    logits = hf.TopKLogitsWarper(settings["top_k"])(None, logits)
    return torch.softmax(logits.double(), -1).numpy()


def test_two_token_sequences_follow_the_model_step_by_step(llama):
    """4096 two-token continuations of one prompt against p(t1) * p(t2 | t1) from the torch model.

    The second token must be drawn from the model's distribution after the first, with fresh randomness:
    reusing the first step's key (or skipping the temperature) shows up as a huge chi-square.
    """
    torch_model, model, params, ids, mask = llama
    settings, draws = dict(temperature=1.5, top_k=6), 4096
    prompt = ids[:1]
    assert mask[:1].all()  # the first prompt has no padding
    out = np.asarray(generate(model, params, prompt, mask[:1], rng=3, max_new_tokens=2, do_sample=True,
                              num_return_sequences=draws, **settings))
    np.testing.assert_array_equal(out, generate(model, params, prompt, mask[:1], rng=jax.random.key(3),
                                                max_new_tokens=2, do_sample=True, num_return_sequences=draws,
                                                **settings))  # an int seed is the key of that seed
    first, second = out[:, -2], out[:, -1]

    vocab, eos, pad = torch_model.config.vocab_size, torch_model.config.eos_token_id, torch_model.config.pad_token_id
    p_first = _processed_probs(torch_model, prompt, settings)[0]
    support = np.flatnonzero(p_first)
    assert len(support) == 6
    p_second = np.zeros((vocab, vocab))
    continued = np.concatenate([np.repeat(prompt, len(support), axis=0), support[:, None]], axis=1)
    p_second[support] = _processed_probs(torch_model, continued, settings)
    if eos in support:  # a row that ended pads
        p_second[eos] = np.eye(vocab)[pad]
    expected = p_first[:, None] * p_second * draws
    observed = np.zeros((vocab, vocab))
    np.add.at(observed, (first, second), 1)
    statistic, dof = chi_square(observed, expected)
    assert dof >= 15
    assert statistic < chi_square_bound(dof), (statistic, dof)


def test_beam_sampling_returns_the_best_two_of_four_drawn_without_replacement(llama):
    """Beam sampling (num_beams=2, one new token) over 2048 copies of one prompt, against an exact count.

    Each row draws M = 4 candidates without replacement from the processed distribution (Gumbel top-k, as
    torch.multinomial without replacement in transformers) and returns the two most probable of them,
    best first. The law of the returned pair is enumerated over all ordered draws of 4 of the 6 tokens.
    """
    torch_model, model, params, ids, mask = llama
    settings, rows = dict(temperature=1.5, top_k=6), 2048
    prompt = np.repeat(ids[:1], rows, axis=0)
    run = lambda seed: np.asarray(generate(  # noqa: E731
        model, params, prompt, np.ones_like(prompt), rng=seed, max_new_tokens=1, do_sample=True, num_beams=2,
        num_return_sequences=2, **settings))[:, -1].reshape(rows, 2)
    pairs = run(0)
    assert (pairs != run(1)).any(axis=1).mean() > 0.15  # another seed, other draws (25% expected)

    q = _processed_probs(torch_model, ids[:1], settings)[0]
    support = np.flatnonzero(q)
    expected = {}
    for draw in itertools.permutations(support, 4):
        probability, left = 1.0, 1.0
        for token in draw:
            probability *= q[token] / left
            left -= q[token]
        best = tuple(sorted(draw, key=lambda t: -q[t])[:2])
        expected[best] = expected.get(best, 0.0) + probability
    assert abs(sum(expected.values()) - 1) < 1e-9
    assert all(q[a] > q[b] for a, b in pairs)  # best first
    cells = sorted(expected)
    observed = [sum(1 for a, b in pairs if (a, b) == cell) for cell in cells]
    assert sum(observed) == rows  # every returned pair is a possible one
    statistic, dof = chi_square(observed, [expected[cell] * rows for cell in cells])
    assert statistic < chi_square_bound(dof), (statistic, dof)
