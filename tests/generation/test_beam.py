"""Beam-search bookkeeping on hand-made probabilities, worked out by hand.

One prompt, 2 beams, vocabulary {0, 1, 2, 3}, eos = 3, at most 3 new tokens, so each step
keeps the best M = max(2, 1 + 1) * 2 = 4 continuations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.generation.beam import BeamSettings, beam_results, beam_search_open, beam_step, init_beam_state

FILL = 9


def settings(**overrides) -> BeamSettings:
    base = dict(num_beams=2, max_new_tokens=3, eos_token_id=(3,), length_penalty=1.0, early_stopping=False,
                fill_token_id=FILL)
    return BeamSettings(**{**base, **overrides})


def step(state, probs, index, config):
    log_probs = jnp.log(jnp.asarray(probs, jnp.float32))[None]  # [B=1, K=2, V=4]
    return beam_step(state, log_probs, jnp.asarray(index), config)


def first_step(config):
    # Both beams start identical; only beam 0 counts. Top 4 of beam 0: tokens 0, 1, 2, 3(eos).
    # Running: 0 (.5) and 1 (.25). Eos ranks 4th, outside the top K=2, so nothing finishes.
    state = init_beam_state(1, config)
    state, source = step(state, [[0.5, 0.25, 0.15, 0.1]] * 2, 0, config)
    np.testing.assert_array_equal(state.running_tokens[0, :, 0], [0, 1])
    np.testing.assert_allclose(state.running_scores[0], np.log([0.5, 0.25]), rtol=1e-6)
    np.testing.assert_array_equal(source[0], [0, 0])
    assert not state.is_finished.any()
    return state


def test_worked_example_to_the_last_step():
    config = settings()
    state = first_step(config)
    # Step 1. Totals: beam [0]: .05 .1 .025 .325(eos); beam [1]: .175 .0375 .025 .0125.
    # Top 4: .325 [0,3] ended, .175 [1,0], .1 [0,1], .05 [0,0]. Running: [1,0] and [0,1] (sources 1, 0).
    # [0,3] is in the top K and ended: finished with log(.325) / 2**1.
    state, source = step(state, [[0.1, 0.2, 0.05, 0.65], [0.7, 0.15, 0.1, 0.05]], 1, config)
    np.testing.assert_array_equal(state.running_tokens[0, :, :2], [[1, 0], [0, 1]])
    np.testing.assert_array_equal(source[0], [1, 0])
    np.testing.assert_allclose(state.running_scores[0], np.log([0.175, 0.1]), rtol=1e-6)
    np.testing.assert_array_equal(state.is_finished[0], [True, False])
    np.testing.assert_allclose(state.finished_scores[0, 0], np.log(0.325) / 2, rtol=1e-6)
    assert bool(beam_search_open(state, config))
    # Step 2 is the last: every continuation ends. Totals: beam [1,0]: .0525 .035 .0175 .07;
    # beam [0,1]: .06 .02 .015 .005. The top K=2 finish: [1,0,3] log(.07)/3 = -0.886 and
    # [0,1,0] log(.06)/3 = -0.938; with [0,3] (-0.562) the best two are [0,3] and [1,0,3].
    state, _ = step(state, [[0.3, 0.2, 0.1, 0.4], [0.6, 0.2, 0.15, 0.05]], 2, config)
    assert not bool(beam_search_open(state, config))
    tokens, lengths = beam_results(state, num_return_sequences=2)
    np.testing.assert_array_equal(tokens, [[0, 3, FILL], [1, 0, 3]])
    np.testing.assert_array_equal(lengths, [2, 3])
    np.testing.assert_allclose(state.finished_scores[0], [np.log(0.325) / 2, np.log(0.07) / 3], rtol=1e-6)


@pytest.mark.parametrize("length_penalty, expected", [
    # lp = 0: raw sums: [0,3] log(.325) = -1.12, [1,0,3] log(.07) = -2.66, [0,1,0] log(.06) = -2.81.
    (0.0, [([0, 3, FILL], 0.325, 2), ([1, 0, 3], 0.07, 3)]),
    # lp = 3 favours length: [0,3] -1.12/8 = -0.140 loses to [1,0,3] -2.66/27 = -0.098 and
    # [0,1,0] -2.81/27 = -0.104.
    (3.0, [([1, 0, 3], 0.07, 3), ([0, 1, 0], 0.06, 3)]),
])
def test_length_penalty_decides_the_ranking(length_penalty, expected):
    config = settings(length_penalty=length_penalty)
    state = first_step(config)
    state, _ = step(state, [[0.1, 0.2, 0.05, 0.65], [0.7, 0.15, 0.1, 0.05]], 1, config)
    state, _ = step(state, [[0.3, 0.2, 0.1, 0.4], [0.6, 0.2, 0.15, 0.05]], 2, config)
    tokens, lengths = beam_results(state, 2)
    np.testing.assert_array_equal(tokens, [t for t, _, _ in expected])
    np.testing.assert_array_equal(lengths, [n for _, _, n in expected])
    scores = [np.log(p) / n**length_penalty for _, p, n in expected]
    np.testing.assert_allclose(state.finished_scores[0], scores, rtol=1e-6)


@pytest.mark.parametrize("early_stopping, open_after", [(True, False), (False, False), ("never", True)])
def test_early_stopping_modes(early_stopping, open_after):
    """Step 1 finishes both top candidates: [0,3] log(.35)/2 = -0.525 and [1,3] log(.175)/2 = -0.871.

    True: K hypotheses finished -> stop. False: the best running beam [0,1] scores
    log(.075)/2 = -1.295 at its current length, below the worst finished -> stop. "never":
    judged at the longest length, log(.075)/3 = -0.863 > -0.871 -> keep going.
    """
    config = settings(early_stopping=early_stopping)
    state = first_step(config)
    state, _ = step(state, [[0.1, 0.15, 0.05, 0.7], [0.05, 0.1, 0.15, 0.7]], 1, config)
    np.testing.assert_array_equal(state.is_finished[0], [True, True])
    np.testing.assert_array_equal(state.finished_tokens[0, :, :2], [[0, 3], [1, 3]])
    assert bool(beam_search_open(state, config)) is open_after


def test_candidates_cover_every_eos():
    assert settings().candidates == 4
    assert settings(eos_token_id=(1, 2, 3)).candidates == 8
    assert settings(eos_token_id=None).candidates == 4
    np.testing.assert_allclose(settings(length_penalty=0.5).penalties(), np.sqrt([1.0, 2.0, 3.0]), rtol=1e-7)


def test_beam_sampling_is_seeded_and_sorted():
    config = settings()
    state = first_step(config)
    probs = jnp.log(jnp.asarray([[[0.1, 0.2, 0.05, 0.65], [0.7, 0.15, 0.1, 0.05]]], jnp.float32))
    a, _ = beam_step(state, probs, jnp.asarray(1), config, jax.random.key(3))
    b, _ = beam_step(state, probs, jnp.asarray(1), config, jax.random.key(3))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert (np.diff(np.asarray(a.running_scores[0])) <= 0).all()  # best first, as the greedy path
