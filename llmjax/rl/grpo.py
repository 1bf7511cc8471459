"""GRPO (Shao et al. 2024): PPO's clipped update without a value head, advantages from a group of samples.

Per prompt, ``group_size`` responses are sampled and scored; each response's advantage is its score
normalised within its group (``llmjax.rl.losses.group_advantages``), the same for all its tokens. The loss
is the clipped surrogate plus ``kl_coef`` times the ``k3`` estimate of KL(policy || reference) per token,
inside the loss rather than in the reward. Trees as in ``llmjax.rl.ppo`` (``reference``), without heads.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from llmjax.loading import model_params
from llmjax.rl import losses
from llmjax.rl.ppo import reference_logprobs
from llmjax.rl.sequences import response_outputs
from llmjax.rl_configs import GRPOConfig

EXPERIENCE_FEATURES = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "old_logp", "ref_logp",
                       "advantages")


def _policy(model, tree, batch):
    logits, _ = response_outputs(model, model_params(tree), batch)
    return logits, losses.token_logprobs(logits, batch["response_ids"])


@partial(jax.jit, static_argnames=("model", "cfg"))
def experience(model, cfg: GRPOConfig, tree: dict, batch: dict, scores: jax.Array):
    """``batch``: ``[P * G]`` rows (a prompt's G samples consecutive), ``scores`` ``[P * G]`` -> ``(features,
    stats)``: ``batch`` plus ``old_logp``, ``ref_logp``, ``advantages`` ``[P * G, T]``; stats ``reward``,
    ``reward_std`` (mean within-group std), ``kl`` (mean summed k3 per response), ``entropy``,
    ``response_length``."""
    mask = batch["response_mask"].astype(jnp.float32)
    logits, logp = _policy(model, tree, batch)
    ref_logp = reference_logprobs(model, tree, batch)
    advantages = losses.group_advantages(scores, cfg.group_size)[:, None] * mask
    kl = losses.kl_penalty(logp, ref_logp, "k3") * mask
    features = {**batch, "old_logp": logp * mask, "ref_logp": ref_logp * mask, "advantages": advantages}
    stats = {
        "reward": jnp.mean(scores),
        "reward_std": jnp.mean(jnp.std(scores.reshape(-1, cfg.group_size), axis=1)),
        "kl": jnp.mean(jnp.sum(kl, axis=1)),
        "entropy": losses.masked_mean(losses.entropy_from_logits(logits), mask),
        "response_length": jnp.mean(jnp.sum(mask, axis=1)),
    }
    return features, stats


def grpo_loss_fn(model, cfg: GRPOConfig):
    """GRPO's ``LossFn``: sums over response tokens of the clipped surrogate plus ``kl_coef * k3`` and of each
    part, ``clipfrac``, ``approx_kl``; ``weights`` = response tokens."""

    def loss_fn(tree, batch, rng):
        del rng  # deterministic, as PPO's
        mask = batch["response_mask"].astype(jnp.float32)
        logits, logp = _policy(model, tree, batch)
        policy, stats = losses.clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], mask, cfg.clip_range)
        kl = losses.masked_sum(losses.kl_penalty(logp, batch["ref_logp"], "k3"), mask)
        objective = policy + cfg.kl_coef * kl
        return objective, {"loss": objective, "policy_loss": policy, "kl_loss": kl,
                           "entropy": losses.masked_sum(losses.entropy_from_logits(logits), mask),
                           "clipfrac": stats["clipfrac"], "approx_kl": stats["approx_kl"], "weights": jnp.sum(mask)}

    return loss_fn
