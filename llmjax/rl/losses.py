"""The math of RL from feedback as small pure functions on fp32 arrays (PPO, GAE, KL, GRPO, DPO).

Shapes: ``B`` rows (sampled responses), ``T`` response tokens, ``V`` vocabulary. ``mask`` is a
``[B, T]`` 0/1 (or weight) array, right-padded: 1 on real response tokens, 0 on padding. Every loss
and statistic that the training loop accumulates over microbatches comes back as a masked SUM (the
loop divides by the summed mask once, as ``llmjax/losses.py`` does for cross-entropy); means are
only where a function's name says so. Targets (advantages, returns, old log-probs and values, the
reference's log-probs) are wrapped in ``stop_gradient``: the gradient reaches the policy and the
value head only through the current ``logp`` and ``values``, and the reference never.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.lax import stop_gradient

from llmjax.errors import InputError

_F32 = jnp.float32


# ----------------------------------------------------------------------------- token distributions


def token_logprobs(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """log p(ids) under the logits: ``logits[b, t, ids[b, t]] - logsumexp_v logits[b, t, v]``.

    ``logits`` ``[B, T, V]`` (any float dtype, computed in fp32), ``ids`` ``[B, T]`` int -> ``[B, T]`` fp32.
    """
    logits = logits.astype(_F32)
    picked = jnp.take_along_axis(logits, ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy of the softmax per position: ``H = logsumexp(z) - sum_v softmax(z)_v z_v``.

    ``logits`` ``[B, T, V]`` -> ``[B, T]`` fp32 (in nats).
    """
    logits = logits.astype(_F32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)


# ----------------------------------------------------------------------------- masked statistics


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """``sum(x * mask)`` over ``axis`` (all axes by default); fp32."""
    return jnp.sum(x.astype(_F32) * mask.astype(_F32), axis=axis)


def _safe_divide(numerator: jax.Array, count: jax.Array) -> jax.Array:
    # An empty mask has a zero numerator too: report 0 rather than NaN.
    return numerator / jnp.where(count == 0, 1.0, count)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """``sum(x * mask) / sum(mask)`` over ``axis``; fp32, 0 where the mask is empty."""
    return _safe_divide(masked_sum(x, mask, axis), jnp.sum(mask.astype(_F32), axis=axis))


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance of the masked entries (all axes): ``mean((x - mean)^2)``, times ``n / (n - 1)`` if unbiased.

    fp32 scalar; ``n = sum(mask)``; with ``n <= 1`` the Bessel factor is dropped (no NaN).
    """
    centered = x.astype(_F32) - masked_mean(x, mask)
    variance = masked_mean(jnp.square(centered), mask)
    if unbiased:
        count = jnp.sum(mask.astype(_F32))
        variance = variance * jnp.where(count > 1, count / jnp.where(count > 1, count - 1, 1.0), 1.0)
    return variance


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` with the masked mean and unbiased variance; padding comes back 0.

    ``shift_mean=False`` adds the mean back (unit variance around the original mean, as TRL does).
    Any shape; fp32 of the same shape.
    """
    x = x.astype(_F32)
    mean = masked_mean(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask > 0, whitened, 0.0)


# ----------------------------------------------------------------------------- KL to the reference


# Schulman, "Approximating KL divergence" (2020): estimators of KL[pi || ref] from tokens sampled from pi,
# written with log r = ref_logp - logp. k1 is unbiased but noisy and can be negative; k2 is biased, low
# variance; k3 is unbiased and always >= 0.
_KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "k1": lambda log_ratio: -log_ratio,
    "k2": lambda log_ratio: 0.5 * jnp.square(log_ratio),
    "k3": lambda log_ratio: jnp.exp(log_ratio) - 1.0 - log_ratio,
}


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token estimate of KL(policy || reference) at sampled tokens; ``[B, T]`` fp32 in, out.

    ``k1 = logp - ref``, ``k2 = (logp - ref)^2 / 2``, ``k3 = exp(ref - logp) - 1 - (ref - logp)``.
    No gradient reaches ``ref_logp``.
    """
    if estimator not in _KL_ESTIMATORS:
        raise InputError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(sorted(_KL_ESTIMATORS))}")
    return _KL_ESTIMATORS[estimator](stop_gradient(ref_logp.astype(_F32)) - logp.astype(_F32))


def _last_token(mask: jax.Array) -> jax.Array:
    """``[B, T]`` 0/1 fp32: 1 at each row's last real token (none in an empty row)."""
    positions = jnp.arange(mask.shape[-1])
    last = jnp.max(jnp.where(mask > 0, positions, -1), axis=-1, keepdims=True)  # -1: no real token
    return (positions == last).astype(_F32)


def token_rewards(scores: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array,
                  kl_coef, estimator: str = "k1") -> tuple[jax.Array, jax.Array]:
    """PPO's per-token reward (Ziegler et al. 2019): ``r_t = -kl_coef * kl_t``, plus ``score`` at the last real token.

    ``scores`` ``[B]`` (reward model), ``logp``/``ref_logp``/``mask`` ``[B, T]``; ``kl_coef`` a float or fp32
    scalar. Returns ``(rewards, kl)``, both ``[B, T]`` fp32 and 0 on padding.
    """
    mask = mask.astype(_F32)
    kl = kl_penalty(logp, ref_logp, estimator) * mask
    rewards = -kl_coef * kl + scores.astype(_F32)[:, None] * _last_token(mask)
    return rewards, kl


# ----------------------------------------------------------------------------- PPO


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation (Schulman et al. 2016), backwards over T.

    ``delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t``; ``A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}``;
    returns ``R_t = A_t + V_t``. ``rewards``/``values``/``mask`` ``[B, T]`` -> ``(advantages, returns)``
    ``[B, T]`` fp32, 0 on padding, without gradient (they are targets).
    """
    rewards, values, mask = (a.astype(_F32) for a in (rewards, values, mask))
    # The value after position t counts only if t + 1 is still a real token (past the end: terminal, 0).
    next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1))) * next_mask
    deltas = rewards + gamma * next_values - values

    def step(next_advantage, inputs):
        delta, continues = inputs
        advantage = delta + gamma * lam * continues * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(step, jnp.zeros(rewards.shape[0], _F32), (deltas.T, next_mask.T), reverse=True)
    advantages = advantages.T * mask
    returns = (advantages + values) * mask
    return stop_gradient(advantages), stop_gradient(returns)


def clipped_policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                        clip_range: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate (Schulman et al. 2017): ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``.

    ``ratio = exp(logp - old_logp)``; all inputs ``[B, T]``. Returns ``(loss_sum, stats)``: the masked SUM of
    the per-token loss (fp32 scalar) and masked SUMS ``clipfrac`` (tokens where the clipped branch is the
    larger, so the token gives no gradient), ``approx_kl`` (``(logp - old_logp)^2 / 2``) and ``ratio``.
    """
    mask = mask.astype(_F32)
    log_ratio = logp.astype(_F32) - stop_gradient(old_logp.astype(_F32))
    ratio = jnp.exp(log_ratio)
    advantages = stop_gradient(advantages.astype(_F32))
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    # where, not maximum: the gradient follows exactly the branch that clipfrac counts (maximum splits ties).
    clip_active = clipped > unclipped
    token_loss = jnp.where(clip_active, clipped, unclipped)
    stats = {
        "clipfrac": masked_sum(clip_active, mask),
        "approx_kl": masked_sum(0.5 * jnp.square(log_ratio), mask),
        "ratio": masked_sum(ratio, mask),
    }
    return masked_sum(token_loss, mask), stop_gradient(stats)


def clipped_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
                       clip_range_value: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped value loss: ``0.5 * max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2)``.

    All inputs ``[B, T]``; gradient only through ``values``. Returns ``(loss_sum, {"vf_clipfrac": sum})``:
    masked SUMS (fp32 scalars); ``vf_clipfrac`` counts tokens where the clipped branch is the larger.
    """
    mask = mask.astype(_F32)
    values = values.astype(_F32)
    old_values, returns = stop_gradient(old_values.astype(_F32)), stop_gradient(returns.astype(_F32))
    unclipped = jnp.square(values - returns)
    clipped_values = jnp.clip(values, old_values - clip_range_value, old_values + clip_range_value)
    clipped = jnp.square(clipped_values - returns)
    clip_active = clipped > unclipped
    token_loss = 0.5 * jnp.where(clip_active, clipped, unclipped)
    return masked_sum(token_loss, mask), stop_gradient({"vf_clipfrac": masked_sum(clip_active, mask)})


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """``1 - Var[R - V] / Var[R]`` over the masked tokens: 1 is a perfect critic, 0 no better than a constant.

    ``[B, T]`` inputs -> fp32 scalar; NaN when the returns are constant (undefined, as in Stable-Baselines3).
    """
    returns = returns.astype(_F32)
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values.astype(_F32), mask, unbiased=False)
    return jnp.where(var_returns == 0, jnp.nan, 1.0 - var_residual / jnp.where(var_returns == 0, 1.0, var_returns))


def adaptive_kl_coef(coef, observed_kl, target, horizon, batch_steps):
    """Ziegler et al. (2019)'s proportional controller toward a target KL.

    ``err = clip(observed_kl / target - 1, -0.2, 0.2)``; new ``coef * (1 + err * batch_steps / horizon)``.
    Python floats in -> a Python float out; any jax scalar in -> an fp32 jax scalar (usable under jit).
    """
    error = observed_kl / target - 1.0
    if all(isinstance(a, (int, float)) for a in (coef, observed_kl, target, horizon, batch_steps)):
        error = min(max(error, -0.2), 0.2)
    else:
        error = jnp.clip(jnp.asarray(error, _F32), -0.2, 0.2)
    return coef * (1.0 + error * batch_steps / horizon)


# ----------------------------------------------------------------------------- GRPO and preferences


def group_advantages(scores: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    """GRPO (Shao et al. 2024): ``(score - group mean) / (group std + eps)`` within each prompt's group.

    ``scores`` ``[P * G]`` with prompt p's G samples in rows ``p*G .. p*G + G - 1`` -> ``[P * G]`` fp32.
    The std is the population std (ddof=0); a group of equal scores gets advantages 0.
    """
    if scores.ndim != 1 or scores.shape[0] % group_size:
        raise InputError(f"group_advantages: expected [prompts * group_size] scores with group_size={group_size}, "
                         f"got shape {tuple(scores.shape)}; sample group_size responses for every prompt")
    groups = scores.astype(_F32).reshape(-1, group_size)
    mean = jnp.mean(groups, axis=1, keepdims=True)
    std = jnp.std(groups, axis=1, keepdims=True)  # ddof=0
    return ((groups - mean) / (std + eps)).reshape(-1)


def bradley_terry_loss(chosen_scores: jax.Array, rejected_scores: jax.Array) -> jax.Array:
    """Pairwise reward-model loss (Bradley-Terry): ``-log sigmoid(chosen - rejected)``; ``[B]`` -> ``[B]`` fp32."""
    return -jax.nn.log_sigmoid(chosen_scores.astype(_F32) - rejected_scores.astype(_F32))


def dpo_loss(policy_chosen_logp: jax.Array, policy_rejected_logp: jax.Array, ref_chosen_logp: jax.Array,
             ref_rejected_logp: jax.Array, beta: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DPO (Rafailov et al. 2023): ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))``.

    Inputs are ``[B]`` sequence log-prob sums of each response under the policy (p) and the frozen
    reference (r). Returns ``(loss, chosen_rewards, rejected_rewards)``, each ``[B]`` fp32; the implicit
    rewards ``beta * (p - r)`` are metrics (no gradient), and no gradient reaches the reference.
    """
    chosen_margin = policy_chosen_logp.astype(_F32) - stop_gradient(ref_chosen_logp.astype(_F32))
    rejected_margin = policy_rejected_logp.astype(_F32) - stop_gradient(ref_rejected_logp.astype(_F32))
    loss = -jax.nn.log_sigmoid(beta * (chosen_margin - rejected_margin))
    return loss, stop_gradient(beta * chosen_margin), stop_gradient(beta * rejected_margin)
