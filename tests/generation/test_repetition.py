"""``no_repeat_ngram_size`` and ``repetition_penalty``: the processors against hand-worked values and
transformers' own processors, then ``generate`` token-identical to ``transformers`` (greedy and beam,
T5 and LLaMA) and the n-gram rule holding in sampled outputs.

Every parity case first checks that the setting bites: without it the same decoding repeats an
n-gram (or yields other tokens), so a processor that did nothing would fail.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from llmjax.generate import generate
from llmjax.generation.families import DecoderOnlyFamily, EncoderDecoderFamily
from llmjax.generation.processors import TokenHistory, ban_repeated_ngrams, penalize_repetitions
from tests.generation.models import prompts, small_model
from tests.test_generate import hf_generate

NEW = 20


def history(tokens, length, first=None) -> TokenHistory:
    tokens = jnp.asarray(tokens, jnp.int32)
    first = jnp.zeros(tokens.shape[0], jnp.int32) if first is None else jnp.asarray(first, jnp.int32)
    return TokenHistory(tokens, jnp.asarray(length, jnp.int32), first)


def repeats_an_ngram(row, n: int, start: int, eos=()) -> bool:
    """Whether a token at column ``start`` or later completes an ``n``-gram that occurred earlier in
    ``row`` (prompt included), looking up to the first eos at or after ``start``."""
    row = [int(t) for t in row]
    end = next((i + 1 for i in range(start, len(row)) if row[i] in eos), len(row))
    seen = set()
    for i in range(end - n + 1):
        gram = tuple(row[i:i + n])
        if i + n - 1 >= start and gram in seen:
            return True
        seen.add(gram)
    return False


# ----------------------------------------------------------------------------
# The processors
# ----------------------------------------------------------------------------

def test_ngram_ban_worked_example():
    # Sequence so far 1 2 3 1 2 (then 9 9, not yet written). Vocabulary 0..9.
    tokens = [[1, 2, 3, 1, 2, 9, 9]]
    scores = jnp.zeros((1, 10))

    def banned(n, length=5):
        return np.flatnonzero(np.isneginf(np.asarray(ban_repeated_ngrams(scores, history(tokens, length), n))[0]))

    # n=3: the last two tokens (1, 2) began 1 2 3, so 3 is banned.
    assert banned(3).tolist() == [3]
    # n=2: the last token 2 was followed by 3 before; the trailing 2 itself has no successor yet.
    assert banned(2).tolist() == [3]
    # n=1: every token already present.
    assert banned(1).tolist() == [1, 2, 3]
    # n=4: suffix (3, 1, 2) never occurred earlier; the buffer's 9s beyond length never count.
    assert banned(4).tolist() == []
    # Too short for an n-gram: nothing banned.
    assert banned(3, length=2).tolist() == []
    assert banned(8).tolist() == []  # n beyond the buffer


def test_repetition_penalty_worked_example():
    # Tokens counted: columns 1..3 of [7, 2, 4, 2, 3] (7 is padding before `first`, 3 not yet written).
    scores = jnp.asarray([[1.0, -1.0, 2.0, 0.5, -3.0, 4.0, 0.0, 6.0]])
    out = np.asarray(penalize_repetitions(scores, history([[7, 2, 4, 2, 3]], 4, first=[1]), 2.0))[0]
    # ids 2 (positive, halved once however often it occurs) and 4 (negative, doubled); 7 and 3 untouched.
    np.testing.assert_array_equal(out, [1.0, -1.0, 1.0, 0.5, -6.0, 4.0, 0.0, 6.0])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_ban_equals_transformers_processor(n):
    """Random sequences over a 3-token vocabulary (so n-grams repeat), every length, junk past it."""
    rng = np.random.default_rng(n)
    tokens = rng.integers(0, 3, size=(8, 20))
    scores = rng.normal(size=(8, 3)).astype(np.float32)
    bans = 0
    for length in range(1, tokens.shape[1] + 1):
        expected = hf.NoRepeatNGramLogitsProcessor(n)(torch.from_numpy(tokens[:, :length]), torch.from_numpy(scores))
        ours = ban_repeated_ngrams(jnp.asarray(scores), history(tokens, length), n)
        np.testing.assert_array_equal(np.asarray(ours), expected.numpy())
        bans += int(np.isneginf(expected.numpy()).sum())
    assert bans > 30


@pytest.mark.parametrize("penalty", [1.3, 0.6])
def test_repetition_penalty_equals_transformers_processor(penalty):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 30, size=(4, 12))
    scores = rng.normal(size=(4, 30)).astype(np.float32)
    for length in (1, 5, 12):
        first = rng.integers(0, length, size=4)
        processor = hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=torch.from_numpy(first))
        expected = processor(torch.from_numpy(tokens[:, :length]), torch.from_numpy(scores)).numpy()
        ours = np.asarray(penalize_repetitions(jnp.asarray(scores), history(tokens, length, first), penalty))
        # XLA on CPU divides by multiplying with the reciprocal: within 1 ulp of torch's division.
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)
        assert (ours != scores).any()


def test_penalty_counts_from_the_first_real_prompt_token():
    """As Hugging Face: a decoder's left padding is not penalized; T5's history (its start token) all is."""
    mask = jnp.asarray([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert DecoderOnlyFamily.prefix_first(mask).tolist() == [2, 0, 3]
    assert EncoderDecoderFamily.prefix_first(mask).tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------
# Through generate, against transformers
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["t5_v1_0", "llama_gqa"])
def setup(request, tmp_path_factory):
    family, torch_model, model, params = small_model(request.param, 0, tmp_path_factory.mktemp(request.param))
    ids, mask = prompts(family, 1, [9, 5, 7], torch_model.config.vocab_size)
    prefix = 1 if family == "t5" else ids.shape[1]
    return dict(family=family, torch=torch_model, model=model, params=params, ids=ids, mask=mask, prefix=prefix)


@pytest.mark.parametrize("settings", [
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=3),
    dict(num_beams=3, no_repeat_ngram_size=2),
    dict(num_beams=3, no_repeat_ngram_size=3, num_return_sequences=2),
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=0.7, no_repeat_ngram_size=2),  # < 1 favours repeats; alone T5 repeats its start token
    dict(num_beams=3, repetition_penalty=3.0),
    dict(num_beams=2, repetition_penalty=1.3, no_repeat_ngram_size=2),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_generate_matches_transformers(setup, settings):
    """eos is a token of row 0's constrained output, so rows end early (and pad) at different steps."""
    torch_model, ids, mask, prefix = setup["torch"], setup["ids"], setup["mask"], setup["prefix"]
    eos = int(hf_generate(torch_model, ids, mask, max_new_tokens=NEW, **settings).numpy()[0, prefix + 8])
    assert eos != torch_model.config.pad_token_id
    settings = dict(max_new_tokens=NEW, eos_token_id=eos, **settings)
    reference = hf_generate(torch_model, ids, mask, **settings).numpy()
    ours = np.asarray(generate(setup["model"], setup["params"], ids, mask, **settings))
    np.testing.assert_array_equal(ours, reference)
    assert (reference[:, prefix:] == eos).any()  # some row ends on eos (greedy rows then pad)

    plain = {k: v for k, v in settings.items() if k not in ("no_repeat_ngram_size", "repetition_penalty")}
    unconstrained = hf_generate(torch_model, ids, mask, **plain).numpy()
    assert unconstrained.shape != reference.shape or (unconstrained != reference).any()  # the setting bites
    n = settings.get("no_repeat_ngram_size")
    if n:
        assert any(repeats_an_ngram(row, n, prefix, (eos,)) for row in unconstrained)
        assert not any(repeats_an_ngram(row, n, prefix, (eos,)) for row in ours)


# LLaMA's copy (~22 s of compiles) is slow; T5's stays in the default suite, and both families' parity with
# transformers above stays in it too.
@pytest.mark.parametrize("setup", ["t5_v1_0", pytest.param("llama_gqa", marks=pytest.mark.slow)], indirect=True)
def test_sampling_never_repeats_an_ngram(setup):
    family, model, params, ids, mask, prefix = (setup[k] for k in ("family", "model", "params", "ids", "mask", "prefix"))
    eos = tuple(np.atleast_1d(setup["torch"].generation_config.eos_token_id).tolist())
    for settings in (dict(num_return_sequences=6), dict(num_beams=2, num_return_sequences=2)):
        settings = dict(max_new_tokens=30, do_sample=True, top_k=0, rng=3, **settings)
        free = np.asarray(generate(model, params, ids, mask, **settings))
        assert sum(repeats_an_ngram(row, 2, prefix, eos) for row in free) >= 2, free
        for n in (1, 2, 3):
            out = np.asarray(generate(model, params, ids, mask, no_repeat_ngram_size=n, **settings))
            assert not any(repeats_an_ngram(row, n, prefix, eos) for row in out), (n, out)


def test_top_k_1_sampling_is_constrained_greedy(setup):
    model, params, ids, mask = setup["model"], setup["params"], setup["ids"], setup["mask"]
    settings = dict(max_new_tokens=NEW, no_repeat_ngram_size=2, repetition_penalty=1.3)
    greedy = np.asarray(generate(model, params, ids, mask, **settings))
    sampled = np.asarray(generate(model, params, ids, mask, do_sample=True, top_k=1, temperature=0.7, rng=0,
                                  **settings))
    np.testing.assert_array_equal(sampled, greedy)
    assert (greedy != np.asarray(generate(model, params, ids, mask, max_new_tokens=NEW))).any()
