"""Sampling through ``generate``: seeded reproducibility, the distribution actually sampled, top_k=1 == greedy."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from llmjax.generate import generate
from tests.generation.models import prompts, small_model


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
