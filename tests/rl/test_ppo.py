"""PPO's experience and loss on a tiny model: the parts equal the hand-composed formulas, gradients flow only
where they should (the value head gets no policy gradient, the reference none at all), KL 0 against itself."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.loading import HEADS_KEY, REFERENCE_KEY
from llmjax.models.heads import VALUE, apply_head, init_head
from llmjax.rl import grpo, ppo
from llmjax.rl.sequences import response_outputs
from llmjax.rl_configs import GRPOConfig, PPOConfig
from tests.rl.test_sequences import DECODER, RESPONSES, PROMPTS, _batch, _init

CFG = PPOConfig(reward_model="unused", kl_coef=0.3, vf_coef=0.5, ent_coef=0.01, clip_range=0.2, lam=0.9, gamma=0.95)


def _tree():
    model, params = _init(DECODER)
    params = nn.meta.unbox(params)
    tree = {**params, HEADS_KEY: {VALUE: init_head(jax.random.key(3), 32, 1)},
            REFERENCE_KEY: jax.tree_util.tree_map(lambda x: x * 1.01, params)}
    return model, tree


def _log_softmax_at(logits, ids):
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(ids)[..., None], -1)[..., 0]


def test_experience_composes_kl_reward_gae_by_hand():
    model, tree = _tree()
    batch = _batch(PROMPTS, RESPONSES, 6, 4, left=True)
    scores = jnp.asarray([1.5, -0.5])
    features, stats = ppo.experience(model, dataclass_replace(CFG, whiten_advantages=False), tree, batch, scores,
                                     np.float32(0.3))
    logits, hidden = response_outputs(model, {k: v for k, v in tree.items() if k not in (HEADS_KEY, REFERENCE_KEY)},
                                      batch)
    ref_logits, _ = response_outputs(model, tree[REFERENCE_KEY], batch)
    mask = batch["response_mask"].astype(np.float64)
    logp, ref_logp = _log_softmax_at(logits, batch["response_ids"]), _log_softmax_at(ref_logits, batch["response_ids"])
    values = np.asarray(apply_head(tree[HEADS_KEY][VALUE], hidden)[..., 0], np.float64) * mask
    kl = (logp - ref_logp) * mask
    # plain loops: reward -0.3 * kl per token, the score at the last real token, then GAE backwards
    advantages = np.zeros_like(kl)
    for row in range(2):
        n = int(mask[row].sum())
        rewards = -0.3 * kl[row, :n]
        rewards[n - 1] += float(scores[row])
        following = 0.0
        for t in reversed(range(n)):
            next_value = values[row, t + 1] if t + 1 < n else 0.0
            delta = rewards[t] + 0.95 * next_value - values[row, t]
            following = delta + 0.95 * 0.9 * following
            advantages[row, t] = following
    np.testing.assert_allclose(features["old_logp"], logp * mask, atol=1e-5)
    np.testing.assert_allclose(features["advantages"], advantages, atol=1e-4)
    np.testing.assert_allclose(features["returns"], (advantages + values) * mask, atol=1e-4)
    np.testing.assert_allclose(stats["kl"], kl.sum(1).mean(), atol=1e-5)
    np.testing.assert_allclose(stats["reward"], 0.5)


def dataclass_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_kl_is_exactly_zero_when_the_policy_is_its_reference():
    model, tree = _tree()
    tree[REFERENCE_KEY] = {k: v for k, v in tree.items() if k not in (HEADS_KEY, REFERENCE_KEY)}
    batch = _batch(PROMPTS, RESPONSES, 6, 4, left=True)
    _, stats = ppo.experience(model, CFG, tree, batch, jnp.zeros(2), np.float32(0.3))
    assert float(stats["kl"]) == 0.0


def _grads(loss_fn, tree, batch):
    return jax.grad(lambda t: loss_fn(t, batch, None)[0])(tree)


def _experience_batch(model, tree):
    batch = _batch(PROMPTS, RESPONSES, 6, 4, left=True)
    features, _ = ppo.experience(model, dataclass_replace(CFG, whiten_advantages=False), tree, batch,
                                 jnp.asarray([1.0, -1.0]), np.float32(0.3))
    # move the old log-probs/values off the current ones so ratios and clipping are exercised
    features = dict(features, old_logp=features["old_logp"] - 0.1 * features["response_mask"],
                    old_values=features["old_values"] + 0.05)
    return features


def test_value_head_gets_only_the_value_loss_gradient_and_the_reference_none():
    model, tree = _tree()
    batch = _experience_batch(model, tree)
    policy_only = ppo.ppo_loss_fn(model, dataclass_replace(CFG, vf_coef=0.0))
    grads = _grads(policy_only, tree, batch)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads[HEADS_KEY]))
    assert float(jnp.abs(grads["embed"]["embedding"]).max()) > 0  # the policy itself learns
    full = _grads(ppo.ppo_loss_fn(model, CFG), tree, batch)
    assert float(jnp.abs(full[HEADS_KEY][VALUE]["kernel"]).max()) > 0
    for g in (grads, full):
        assert all(float(jnp.abs(leaf).max()) == 0.0 for leaf in jax.tree_util.tree_leaves(g[REFERENCE_KEY]))


def test_ppo_loss_sums_are_the_clipped_parts_by_hand():
    model, tree = _tree()
    batch = _experience_batch(model, tree)
    objective, sums = ppo.ppo_loss_fn(model, CFG)(tree, batch, None)
    logits, hidden = response_outputs(model, {k: v for k, v in tree.items() if k not in (HEADS_KEY, REFERENCE_KEY)},
                                      batch)
    mask = np.asarray(batch["response_mask"], np.float64)
    logp = _log_softmax_at(logits, batch["response_ids"])
    ratio = np.exp(logp - np.asarray(batch["old_logp"]))
    adv = np.asarray(batch["advantages"], np.float64)
    policy = (np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)) * mask).sum()
    values = np.asarray(apply_head(tree[HEADS_KEY][VALUE], hidden)[..., 0], np.float64)
    old, ret = np.asarray(batch["old_values"], np.float64), np.asarray(batch["returns"], np.float64)
    value = (0.5 * np.maximum((values - ret) ** 2, (np.clip(values, old - 0.2, old + 0.2) - ret) ** 2) * mask).sum()
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = (-(p * np.log(p)).sum(-1) * mask).sum()
    np.testing.assert_allclose(sums["policy_loss"], policy, rtol=1e-4)
    np.testing.assert_allclose(sums["value_loss"], value, rtol=1e-4)
    np.testing.assert_allclose(sums["entropy"], entropy, rtol=1e-4)
    np.testing.assert_allclose(objective, policy + 0.5 * value - 0.01 * entropy, rtol=1e-4)
    assert float(sums["weights"]) == mask.sum()


def test_adaptive_kl_coefficient_moves_toward_the_target():
    assert ppo.next_kl_coef(CFG, 0.2, observed_kl=12.0, responses=100) > 0.2  # above target: penalise more
    assert ppo.next_kl_coef(CFG, 0.2, observed_kl=1.0, responses=100) < 0.2
    assert ppo.next_kl_coef(dataclass_replace(CFG, adaptive_kl=False), 0.2, 12.0, 100) == 0.2
    # Ziegler et al.: 0.2 * (1 + clip(12/6 - 1, -0.2, 0.2) * 100 / 10000)
    assert abs(ppo.next_kl_coef(CFG, 0.2, 12.0, 100) - 0.2 * (1 + 0.2 * 100 / 10000)) < 1e-12


def test_grpo_advantages_are_group_normalised_scores_on_every_token():
    model, tree = _tree()
    batch = _batch(PROMPTS * 2, RESPONSES * 2, 6, 4, left=True)  # groups of two consecutive rows
    scores = jnp.asarray([1.0, 3.0, 0.0, 0.0])
    cfg = GRPOConfig(reward_model="unused", group_size=2)
    features, stats = grpo.experience(model, cfg, tree, batch, scores)
    expected = np.asarray([-1.0, 1.0, 0.0, 0.0]) / (1 + 1e-6)
    mask = np.asarray(batch["response_mask"])
    np.testing.assert_allclose(features["advantages"], expected[:, None] * mask, atol=1e-5)
    np.testing.assert_allclose(stats["reward_std"], 0.5)
    grads = _grads(grpo.grpo_loss_fn(model, cfg), tree, features)
    assert all(float(jnp.abs(leaf).max()) == 0.0 for leaf in jax.tree_util.tree_leaves(grads[REFERENCE_KEY]))
