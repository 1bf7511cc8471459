"""PPO for language models: the experience of one rollout and the loss of its updates.

The RLHF recipe (Ziegler et al. 2019, the course's RLHF chapter), for T5 and decoders alike:

1. sample a response to every prompt from the current policy (``llmjax.rl.rollout``);
2. score each with the reward model; read the policy's token log-probs and values (its value head) and
   the frozen reference's token log-probs;
3. per-token reward ``-kl_coef * KL_t``, the score added at the last token; GAE(gamma, lambda) advantages and
   returns, advantages whitened over the batch (:func:`experience`);
4. ``epochs`` passes of ``minibatches`` updates of ``L = L_policy + vf_coef * L_value - ent_coef * entropy``
   with the clipped surrogate and the clipped value loss (:func:`ppo_loss_fn`; the loop's multi-update step);
5. move ``kl_coef`` toward ``target_kl`` (adaptive controller), kept in the data state so a resume continues it.

The tree the functions read (a run's tree, or under LoRA ``llmjax.stages.adapters``' view of it): the policy's
model params, ``heads["value"]``, and ``reference``: the frozen reference's model params (under LoRA the base
with adapters off, otherwise a frozen copy of the initial params).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from llmjax.loading import HEADS_KEY, REFERENCE_KEY, model_params
from llmjax.models.heads import VALUE, apply_head
from llmjax.rl import losses
from llmjax.rl.sequences import response_outputs
from llmjax.rl_configs import PPOConfig

EXPERIENCE_FEATURES = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "old_logp", "old_values",
                       "advantages", "returns")


def policy_outputs(model, tree: dict, batch: dict):
    """``(logits [B, T, V], token log-probs [B, T], values [B, T])`` of the policy (deterministic: no dropout,
    so a rollout and the update that follows it compute the same probabilities)."""
    logits, hidden = response_outputs(model, model_params(tree), batch)
    logp = losses.token_logprobs(logits, batch["response_ids"])
    values = apply_head(tree[HEADS_KEY][VALUE], hidden)[..., 0]
    return logits, logp, values


def reference_logprobs(model, tree: dict, batch: dict) -> jax.Array:
    """``[B, T]`` token log-probs of the responses under the frozen reference; no gradient reaches it."""
    logits, _ = response_outputs(model, jax.lax.stop_gradient(tree[REFERENCE_KEY]), batch)
    return losses.token_logprobs(logits, batch["response_ids"])


@partial(jax.jit, static_argnames=("model", "cfg"))
def experience(model, cfg: PPOConfig, tree: dict, batch: dict, scores: jax.Array, kl_coef: jax.Array):
    """One rollout batch's training features and statistics.

    ``batch``: a scored batch of the sampled responses; ``scores`` ``[B]``: the reward model's. Returns
    ``(features, stats)``: ``batch`` plus ``old_logp``, ``old_values``, ``advantages``, ``returns`` (``[B, T]``
    fp32), and fp32 scalars ``reward`` (mean score), ``kl`` (mean summed KL per response), ``non_score_reward``,
    ``entropy`` (mean per token), ``response_length``, ``explained_variance`` (values vs returns),
    ``advantage_std`` (before whitening).
    """
    mask = batch["response_mask"].astype(jnp.float32)
    logits, logp, values = policy_outputs(model, tree, batch)
    ref_logp = reference_logprobs(model, tree, batch)
    rewards, kl = losses.token_rewards(scores, logp, ref_logp, mask, kl_coef, cfg.kl_estimator)
    values = values * mask
    advantages, returns = losses.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    advantage_std = jnp.sqrt(losses.masked_var(advantages, mask))
    if cfg.whiten_advantages:
        advantages = losses.masked_whiten(advantages, mask)
    features = {**batch, "old_logp": logp * mask, "old_values": values, "advantages": advantages, "returns": returns}
    stats = {
        "reward": jnp.mean(scores),
        "kl": jnp.mean(jnp.sum(kl, axis=1)),
        "non_score_reward": jnp.mean(jnp.sum(-kl_coef * kl, axis=1)),
        "entropy": losses.masked_mean(losses.entropy_from_logits(logits), mask),
        "response_length": jnp.mean(jnp.sum(mask, axis=1)),
        "explained_variance": losses.explained_variance(values, returns, mask),
        "advantage_std": advantage_std,
    }
    return features, stats


def ppo_loss_fn(model, cfg: PPOConfig):
    """The PPO update's ``LossFn`` (``llmjax.train.step``) on experience batches: sums over response tokens of
    ``L_policy + vf_coef * L_value - ent_coef * entropy`` and of each part, ``clipfrac``, ``approx_kl``,
    ``vf_clipfrac``; ``weights`` = response tokens. The value head gets only the value loss's gradient, the
    reference none (it is not read)."""

    def loss_fn(tree, batch, rng):
        del rng  # deterministic: the ratio compares against the rollout's dropout-free log-probs
        mask = batch["response_mask"].astype(jnp.float32)
        logits, logp, values = policy_outputs(model, tree, batch)
        policy, policy_stats = losses.clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], mask,
                                                          cfg.clip_range)
        value, value_stats = losses.clipped_value_loss(values, batch["old_values"], batch["returns"], mask,
                                                       cfg.clip_range_value)
        entropy = losses.masked_sum(losses.entropy_from_logits(logits), mask)
        objective = policy + cfg.vf_coef * value - cfg.ent_coef * entropy
        return objective, {"loss": objective, "policy_loss": policy, "value_loss": value, "entropy": entropy,
                           "clipfrac": policy_stats["clipfrac"], "approx_kl": policy_stats["approx_kl"],
                           "vf_clipfrac": value_stats["vf_clipfrac"], "weights": jnp.sum(mask)}

    return loss_fn


def next_kl_coef(cfg: PPOConfig, kl_coef: float, observed_kl: float, responses: int) -> float:
    """The KL coefficient for the next rollout: Ziegler et al.'s controller toward ``target_kl`` (``responses``
    sampled this rollout count toward ``kl_horizon``), or unchanged without ``adaptive_kl``."""
    if not cfg.adaptive_kl:
        return kl_coef
    return float(losses.adaptive_kl_coef(float(kl_coef), float(observed_kl), cfg.target_kl, cfg.kl_horizon,
                                         responses))
