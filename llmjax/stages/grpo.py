"""GRPO from a fine-tuned model against a reward model (``stage: grpo``; ``llmjax.rl.grpo``).

The PPO stage's machinery (``llmjax.stages.ppo.rollout_stage``: prompts, sampling, reward model, frozen
reference, LoRA) with ``grpo.group_size`` responses per prompt (``train.batch_size`` prompts per rollout),
advantages normalised within each prompt's group, no value head, and the KL to the reference in the loss.
Metrics: reward, reward_std, kl, entropy, response_length (rollout), policy_loss, kl_loss, clipfrac,
approx_kl (updates).
"""

from __future__ import annotations

import jax
import numpy as np

from llmjax.config import RunConfig
from llmjax.loading import LoadedModel
from llmjax.rl import grpo
from llmjax.stages.ppo import rollout_stage
from llmjax.train.loop import Stage



def build_stage(config: RunConfig, loaded: LoadedModel | None = None) -> Stage:
    """The GRPO stage of ``config`` (``loaded``: its ``init_from`` already read by ``resolve_init``)."""
    cfg = config.grpo

    def make_experience(model, tree, batch, scores, data):
        features, stats = jax.device_get(grpo.experience(model, cfg, tree, batch, scores))
        return ({k: np.asarray(features[k]) for k in grpo.EXPERIENCE_FEATURES},
                {name: float(value) for name, value in stats.items()})

    return rollout_stage(config, loaded, loss_fn=grpo.grpo_loss_fn, make_experience=make_experience,
                         value_head=False, copies=cfg.group_size)
