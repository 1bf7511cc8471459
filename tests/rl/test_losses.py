"""The RL math against values worked out by hand on tiny arrays, plus where gradients may flow.

Each expected number below was derived on paper (the derivation sits in the comment beside it) or by a
plain-Python loop written here independently of ``llmjax.rl.losses``. Padding entries hold garbage on
purpose (100, 9.0, ...): a function that forgot the mask would fail.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.rl import losses as L

LN = math.log
F32 = np.float32


def close(actual, expected, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=1e-5, atol=atol)


# ----------------------------------------------------------------------------- token distributions


def test_token_logprobs_and_entropy_by_hand():
    # Probabilities [1/4, 1/4, 1/2] (logits = log p + 7, the shift must not matter) and uniform over 3.
    quarter = np.log(np.array([1.0, 1.0, 2.0])) + 7.0
    logits = np.array([[quarter, quarter], [np.zeros(3), [0.0, -100.0, -100.0]]], F32)
    ids = np.array([[2, 0], [1, 0]])
    close(L.token_logprobs(logits, ids), [[LN(0.5), LN(0.25)], [-LN(3), 0.0]], atol=1e-5)
    # H([1/4, 1/4, 1/2]) = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2; uniform: ln 3; near one-hot: ~0.
    close(L.entropy_from_logits(logits), [[1.5 * LN(2), 1.5 * LN(2)], [LN(3), 0.0]], atol=1e-5)
    bf16 = L.token_logprobs(jnp.asarray(logits, jnp.bfloat16), ids)
    assert bf16.dtype == jnp.float32 and L.entropy_from_logits(jnp.asarray(logits, jnp.bfloat16)).dtype == jnp.float32


# ----------------------------------------------------------------------------- masked statistics

X = np.array([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]], F32)
X_MASK = np.array([[1, 1, 1], [1, 0, 0]], F32)


def test_masked_statistics_by_hand():
    # Real entries 1, 2, 3, 4: sum 10, mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5.
    close(L.masked_sum(X, X_MASK), 10.0)
    close(L.masked_sum(X, X_MASK, axis=1), [6.0, 4.0])
    close(L.masked_mean(X, X_MASK), 2.5)
    close(L.masked_mean(X, X_MASK, axis=1), [2.0, 4.0])
    close(L.masked_var(X, X_MASK, unbiased=False), 5.0 / 4)
    close(L.masked_var(X, X_MASK), 5.0 / 3)
    # An empty mask is 0, not NaN; one entry has no spread (no Bessel division by zero).
    assert float(L.masked_mean(X, np.zeros_like(X_MASK))) == 0.0
    assert float(L.masked_var(X, np.array([[0, 1, 0], [0, 0, 0]], F32))) == 0.0


def test_masked_whiten_by_hand():
    # (x - 2.5) / sqrt(5/3), padding 0.
    s = math.sqrt(5.0 / 3)
    expected = [[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]]
    close(L.masked_whiten(X, X_MASK), expected)
    # shift_mean=False keeps the original mean 2.5 (on real entries only).
    close(L.masked_whiten(X, X_MASK, shift_mean=False), np.array(expected) + 2.5 * X_MASK)


def test_masked_whiten_gives_mean_zero_unit_variance_and_zero_padding():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(4, 7)) * 3 + 5).astype(F32)
    lengths = np.array([7, 3, 1, 5])
    mask = (np.arange(7)[None, :] < lengths[:, None]).astype(F32)
    x[mask == 0] = 1e4  # garbage in the padding must not leak into the statistics
    white = np.asarray(L.masked_whiten(x, mask))
    real = white[mask == 1]
    assert abs(real.mean()) < 1e-6
    np.testing.assert_allclose(real.var(ddof=1), 1.0, rtol=1e-5)
    assert np.all(white[mask == 0] == 0.0)


# ----------------------------------------------------------------------------- KL and token rewards

LOGP = np.array([[-1.0, -2.0, -0.5]], F32)
REF = np.array([[-1.5, -1.0, -0.5]], F32)


def test_kl_estimators_by_hand():
    # logp - ref = [0.5, -1, 0]; ref - logp = [-0.5, 1, 0].
    close(L.kl_penalty(LOGP, REF, "k1"), [[0.5, -1.0, 0.0]])
    close(L.kl_penalty(LOGP, REF, "k2"), [[0.125, 0.5, 0.0]])
    # k3 = exp(ref - logp) - 1 - (ref - logp): e^-0.5 - 0.5, e - 2, 0.
    close(L.kl_penalty(LOGP, REF, "k3"), [[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]])
    assert L.kl_penalty(LOGP, REF).tolist() == L.kl_penalty(LOGP, REF, "k1").tolist()  # k1 is the default


def test_kl_gradient_reaches_the_policy_not_the_reference():
    grad_logp, grad_ref = jax.grad(lambda a, b: jnp.sum(L.kl_penalty(a, b, "k3")), argnums=(0, 1))(LOGP, REF)
    # d/dlogp [exp(ref - logp) - 1 - (ref - logp)] = 1 - exp(ref - logp)
    close(grad_logp, 1.0 - np.exp(REF - LOGP))
    assert np.all(np.asarray(grad_ref) == 0.0)


def test_unknown_estimator_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; choose one of k1, k2, k3"):
        L.kl_penalty(LOGP, REF, "k4")
    with pytest.raises(ValueError, match="k1, k2, k3"):
        L.token_rewards(np.zeros(1, F32), LOGP, REF, np.ones((1, 3), F32), 0.1, estimator="full")


def test_token_rewards_by_hand():
    logp = np.array([[-1.0, -2.0, -0.5], [-0.2, -0.3, -9.0], [-1.0, -1.0, -1.0]], F32)
    ref = np.array([[-1.5, -1.0, -0.5], [-0.4, -0.3, -1.0], [-2.0, -2.0, -2.0]], F32)
    mask = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], F32)  # full row, padded row, empty row
    scores = np.array([2.0, -1.0, 5.0], F32)
    rewards, kl = L.token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # k1 per token: row 0 [0.5, -1, 0]; row 1 [0.2, 0, (padding -8 -> 0)]; row 2 all padding.
    close(kl, [[0.5, -1.0, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # -0.1 * kl, and the score at the last real token (t=2 in row 0, t=1 in row 1, nowhere in row 2).
    close(rewards, [[-0.05, 0.1, 2.0], [-0.02, -1.0, 0.0], [0.0, 0.0, 0.0]])
    # kl_coef as a traced scalar (the adaptive controller's value) gives the same.
    traced = jax.jit(lambda c: L.token_rewards(scores, logp, ref, mask, c)[0])(jnp.float32(0.1))
    close(traced, rewards)


# ----------------------------------------------------------------------------- GAE

def test_gae_by_hand():
    rewards = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 7.0]], F32)
    values = np.array([[0.5, 1.0, 1.5], [1.0, 2.0, 9.0]], F32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], F32)
    advantages, returns = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)  # gamma * lam = 0.72
    # Row 0: deltas t2 = 2 - 1.5 = 0.5; t1 = 0 + 0.9 * 1.5 - 1 = 0.35; t0 = 1 + 0.9 * 1 - 0.5 = 1.4.
    #   A2 = 0.5; A1 = 0.35 + 0.72 * 0.5 = 0.71; A0 = 1.4 + 0.72 * 0.71 = 1.9112.
    # Row 1 (t2 padding: its value 9 and reward 7 must not count): delta t1 = 3 - 2 = 1 = A1;
    #   delta t0 = 0 + 0.9 * 2 - 1 = 0.8; A0 = 0.8 + 0.72 * 1 = 1.52.
    close(advantages, [[1.9112, 0.71, 0.5], [1.52, 1.0, 0.0]])
    close(returns, [[2.4112, 1.71, 2.0], [2.52, 3.0, 0.0]])


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_values():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(3, 6)).astype(F32)
    values = rng.normal(size=(3, 6)).astype(F32)
    lengths = [6, 4, 1]
    mask = (np.arange(6)[None, :] < np.array(lengths)[:, None]).astype(F32)
    expected = np.zeros((3, 6))
    for b, n in enumerate(lengths):  # plain loop: sum of rewards from t to the row's end, minus V_t
        for t in range(n):
            expected[b, t] = sum(float(rewards[b, k]) for k in range(t, n)) - float(values[b, t])
    advantages, returns = L.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(advantages, expected, atol=1e-5)
    close(returns, (expected + values) * mask, atol=1e-5)


def test_gae_outputs_are_targets_without_gradient():
    rewards = jnp.ones((1, 3))
    grad = jax.grad(lambda v: jnp.sum(L.gae(rewards, v, jnp.ones((1, 3)), 0.9, 0.95)[0]))(jnp.ones((1, 3)))
    assert np.all(np.asarray(grad) == 0.0)


# ----------------------------------------------------------------------------- PPO losses

# Tokens (eps = 0.2), row 0 then row 1, last one padding:
#   A=1,  ratio 1.5: -1.5 vs clipped -1.2 -> clipped (no gradient), loss -1.2
#   A=1,  ratio 0.5: -0.5 vs clipped -0.8 -> unclipped, loss -0.5, d/dlogp = -A * ratio = -0.5
#   A=-2, ratio 1.5:  3.0 vs clipped  2.4 -> unclipped, loss 3.0,  d/dlogp = 3.0
#   A=-2, ratio 0.5:  1.0 vs clipped  1.6 -> clipped, loss 1.6
#   A=0.5, ratio 1:  -0.5 both (inside the range) -> unclipped, loss -0.5, d/dlogp = -0.5
ADV = np.array([[1.0, 1.0, -2.0], [-2.0, 0.5, 100.0]], F32)
RATIO = np.array([[1.5, 0.5, 1.5], [0.5, 1.0, 3.0]], F32)
OLD_LOGP = np.array([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]], F32)
NEW_LOGP = OLD_LOGP + np.log(RATIO)
MASK = np.array([[1, 1, 1], [1, 1, 0]], F32)


def test_clipped_policy_loss_by_hand():
    loss_sum, stats = L.clipped_policy_loss(NEW_LOGP, OLD_LOGP, ADV, MASK, clip_range=0.2)
    close(loss_sum, -1.2 - 0.5 + 3.0 + 1.6 - 0.5)
    close(stats["clipfrac"], 2.0)
    close(stats["ratio"], 1.5 + 0.5 + 1.5 + 0.5 + 1.0)
    close(stats["approx_kl"], LN(1.5) ** 2 + LN(2.0) ** 2)  # 0.5 * (2 ln(1.5)^2 + 2 ln(0.5)^2 + 0)


def test_clipped_policy_loss_gradients():
    grads = jax.grad(lambda lp, old, adv: L.clipped_policy_loss(lp, old, adv, MASK, 0.2)[0],
                     argnums=(0, 1, 2))(NEW_LOGP, OLD_LOGP, ADV)
    # Clipped tokens and padding: 0; the others -A * ratio.
    close(grads[0], [[0.0, -0.5, 3.0], [0.0, -0.5, 0.0]])
    assert np.all(np.asarray(grads[1]) == 0.0) and np.all(np.asarray(grads[2]) == 0.0)


def test_clipped_value_loss_by_hand():
    # eps = 0.2; tokens:
    #   v=1, old=0.5, R=2: clip(v) = 0.7; (1-2)^2 = 1 vs (0.7-2)^2 = 1.69 -> clipped, 0.845, no gradient
    #   v=1, old=0.9, R=0: clip(v) = 1 (inside); 1 vs 1 -> unclipped, 0.5, d/dv = v - R = 1
    #   v=0, old=0.5, R=1: clip(v) = 0.3; 1 vs 0.49 -> unclipped, 0.5, d/dv = -1
    #   v=2, old=1,   R=3: clip(v) = 1.2; 1 vs 3.24 -> clipped, 1.62
    values = np.array([[1.0, 1.0, 0.0], [2.0, 5.0, 5.0]], F32)
    old_values = np.array([[0.5, 0.9, 0.5], [1.0, 0.0, 0.0]], F32)
    returns = np.array([[2.0, 0.0, 1.0], [3.0, 9.0, 9.0]], F32)
    mask = np.array([[1, 1, 1], [1, 0, 0]], F32)
    loss_sum, stats = L.clipped_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    close(loss_sum, 0.845 + 0.5 + 0.5 + 1.62)
    close(stats["vf_clipfrac"], 2.0)
    grads = jax.grad(lambda v, o, r: L.clipped_value_loss(v, o, r, mask, 0.2)[0], argnums=(0, 1, 2))(
        values, old_values, returns)
    close(grads[0], [[0.0, 1.0, -1.0], [0.0, 0.0, 0.0]])
    assert np.all(np.asarray(grads[1]) == 0.0) and np.all(np.asarray(grads[2]) == 0.0)


def test_explained_variance_by_hand():
    returns = np.array([[1.0, 2.0, 3.0], [4.0, 50.0, 50.0]], F32)
    values = np.array([[1.0, 2.0, 3.0], [2.0, -7.0, -7.0]], F32)
    # Residuals [0, 0, 0, 2]: var 0.75; returns [1, 2, 3, 4]: var 1.25; 1 - 0.75 / 1.25 = 0.4.
    close(L.explained_variance(values, returns, X_MASK), 0.4)
    close(L.explained_variance(returns, returns, X_MASK), 1.0)
    assert np.isnan(float(L.explained_variance(values, np.ones_like(returns), X_MASK)))


def test_adaptive_kl_coef_by_hand():
    # coef 0.2, target 6, horizon 10000, 256 steps per batch: step = err * 0.0256, err clipped to [-0.2, 0.2].
    for observed, expected in [(3.0, 0.2 * (1 - 0.2 * 0.0256)),   # 3/6 - 1 = -0.5 -> -0.2
                               (6.6, 0.2 * (1 + 0.1 * 0.0256)),   # 0.1, inside the clip
                               (12.0, 0.2 * (1 + 0.2 * 0.0256)),  # 1 -> 0.2
                               (6.0, 0.2)]:
        new = L.adaptive_kl_coef(0.2, observed, 6.0, 10000, 256)
        assert isinstance(new, float)
        close(new, expected, atol=1e-12)
        traced = jax.jit(L.adaptive_kl_coef)(jnp.float32(0.2), jnp.float32(observed), 6.0, 10000, 256)
        assert traced.dtype == jnp.float32
        close(traced, expected)


# ----------------------------------------------------------------------------- GRPO and preferences


def test_group_advantages_by_hand():
    scores = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], F32)
    # Group [1, 2, 3]: mean 2, population std sqrt(2/3); group of equal scores: 0.
    s = math.sqrt(2.0 / 3) + 1e-6
    close(L.group_advantages(scores, 3), [-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0])
    # Groups of 2: [1, 2] -> mean 1.5, std 0.5; [3, 5] -> mean 4, std 1; [5, 5] -> 0.
    close(L.group_advantages(scores, 2), [-1.0, 1.0, -1.0, 1.0, 0.0, 0.0], atol=1e-5)
    with pytest.raises(ValueError, match="group_size=4"):
        L.group_advantages(scores, 4)


def test_bradley_terry_loss_by_hand():
    chosen = np.array([0.0, LN(3), 0.0, 100.0, -100.0], F32)
    rejected = np.array([0.0, 0.0, LN(3), 0.0, 0.0], F32)
    # -log sigmoid(d): d=0 -> ln 2; d=ln 3 -> -ln(3/4); d=-ln 3 -> -ln(1/4); d=100 -> ~0; d=-100 -> 100 (finite).
    close(L.bradley_terry_loss(chosen, rejected), [LN(2), LN(4 / 3), LN(4), 0.0, 100.0], atol=1e-5)


def test_dpo_loss_by_hand_and_gradients():
    pc, pr = np.array([-10.0, -5.0], F32), np.array([-12.0, -7.0], F32)
    rc, rr = np.array([-11.0, -5.0], F32), np.array([-11.0, -7.0], F32)
    loss, chosen_rewards, rejected_rewards = L.dpo_loss(pc, pr, rc, rr, beta=0.1)
    # Row 0: margins (pc - rc) = 1, (pr - rr) = -1 -> -log sigmoid(0.1 * 2) = log(1 + e^-0.2). Row 1: ln 2.
    close(loss, [LN(1 + math.exp(-0.2)), LN(2)])
    close(chosen_rewards, [0.1, 0.0])
    close(rejected_rewards, [-0.1, 0.0])
    grads = jax.grad(lambda *a: jnp.sum(L.dpo_loss(*a, beta=0.1)[0]), argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    # d/dpc = -beta * sigmoid(-beta * 2) in row 0, -beta / 2 in row 1; d/dpr the opposite; reference: none.
    g0 = 0.1 / (1 + math.exp(0.2))
    close(grads[0], [-g0, -0.05])
    close(grads[1], [g0, 0.05])
    assert np.all(np.asarray(grads[2]) == 0.0) and np.all(np.asarray(grads[3]) == 0.0)


# ----------------------------------------------------------------------------- jit


def test_everything_jits_to_the_eager_values():
    rewards = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 7.0]], F32)
    scores = np.array([1.0, 2.0], F32)
    # (function, array arguments traced by jit): nothing is a compile-time constant.
    cases = [
        (lambda r, v, m: L.gae(r, v, m, 0.9, 0.8), (rewards, NEW_LOGP, MASK)),
        (lambda s, a, b, m: L.token_rewards(s, a, b, m, 0.1, "k3"), (scores, NEW_LOGP, OLD_LOGP, MASK)),
        (lambda a, b, c, m: L.clipped_policy_loss(a, b, c, m, 0.2), (NEW_LOGP, OLD_LOGP, ADV, MASK)),
        (lambda a, b, c, m: L.clipped_value_loss(a, b, c, m, 0.2), (NEW_LOGP, OLD_LOGP, ADV, MASK)),
        (L.masked_whiten, (ADV, MASK)),
        (L.explained_variance, (NEW_LOGP, ADV, MASK)),
        (lambda s: L.group_advantages(s, 3), (ADV.reshape(-1),)),
        (lambda a, b, c, d: L.dpo_loss(a, b, c, d, 0.5), (ADV[0], ADV[1], OLD_LOGP[0], OLD_LOGP[1])),
        (L.bradley_terry_loss, (ADV[0], ADV[1])),
    ]
    for function, args in cases:
        eager, jitted = function(*args), jax.jit(function)(*args)
        for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted), strict=True):
            assert a.dtype == jnp.float32
            close(b, a)
