"""Optax optimizers and learning-rate schedules from an :class:`~llmjax.config.OptimConfig`.

``make_optimizer`` chains global-norm clipping and AdamW or Adafactor and applies weight decay only where
the decay mask says. Freezing is not the optimizer's job: the train state hands it the trainable
parameters only (``llmjax.train.state``), so a frozen base never has optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from llmjax.config import OptimConfig

Mask = Any  # a pytree of bools shaped like the params, or a callable params -> such a pytree


# ----------------------------------------------------------------------------------------------------
# Schedules: all warm up linearly from 0 over `warmup_steps`, then decay (step counts from the warmup end).


def _constant(cfg: OptimConfig, decay_steps: int) -> optax.Schedule:
    return optax.constant_schedule(cfg.learning_rate)


def _cosine(cfg: OptimConfig, decay_steps: int) -> optax.Schedule:
    return optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.final_lr_fraction)


def _linear(cfg: OptimConfig, decay_steps: int) -> optax.Schedule:
    return optax.linear_schedule(cfg.learning_rate, cfg.learning_rate * cfg.final_lr_fraction, decay_steps)


def _rsqrt(cfg: OptimConfig, decay_steps: int) -> optax.Schedule:
    # lr * sqrt(warmup / step) measured from step 0, i.e. T5's 1/sqrt(max(step, warmup)) scaled to lr.
    offset = max(cfg.warmup_steps, 1)
    return lambda count: cfg.learning_rate * jnp.sqrt(offset / (jnp.maximum(count, 0) + offset))


SCHEDULES: dict[str, Callable[[OptimConfig, int], optax.Schedule]] = {
    "constant": _constant, "cosine": _cosine, "linear": _linear, "rsqrt": _rsqrt,
}


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Step -> learning rate: linear warmup to ``cfg.learning_rate``, then ``cfg.schedule`` until ``total_steps``."""
    decay = SCHEDULES[cfg.schedule](cfg, max(total_steps - cfg.warmup_steps, 1))
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


# ----------------------------------------------------------------------------------------------------
# Masks


def default_decay_mask(params, decay_norms_and_biases: bool = False, decay_embeddings: bool = False):
    """True where weight decay applies: matrices, optionally norms/biases (< 2-D) and embedding tables.

    Embedding tables are the leaves named ``*embedding`` (token embeddings, T5 relative-position tables).
    """
    def decays(path, leaf) -> bool:
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        if name.endswith("embedding"):
            return decay_embeddings
        return leaf.ndim >= 2 or decay_norms_and_biases

    return jax.tree_util.tree_map_with_path(decays, params)


# ----------------------------------------------------------------------------------------------------
# Optimizers


def _adamw(cfg: OptimConfig, schedule: optax.Schedule, decay_mask: Mask) -> optax.GradientTransformation:
    # b1/b2/eps left None keep optax's defaults: one place for them.
    betas = {k: v for k, v in (("b1", cfg.b1), ("b2", cfg.b2), ("eps", cfg.eps)) if v is not None}
    return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask, **betas)


def _adafactor(cfg: OptimConfig, schedule: optax.Schedule, decay_mask: Mask) -> optax.GradientTransformation:
    extra = {"eps": cfg.eps} if cfg.eps is not None else {}
    # optax's Adafactor adds decay after the learning rate; scaling it by the schedule keeps
    # `weight_decay` meaning the same as in AdamW (decoupled, times the current learning rate).
    decay_rate = (lambda count: cfg.weight_decay * schedule(count)) if cfg.weight_decay else None
    return optax.adafactor(
        schedule,
        decay_rate=cfg.adafactor_decay_rate,
        momentum=cfg.b1 or None,  # T5 trains without momentum
        weight_decay_rate=decay_rate,
        weight_decay_mask=decay_mask,
        **extra,
    )


OPTIMIZERS: dict[str, Callable[[OptimConfig, optax.Schedule, Mask], optax.GradientTransformation]] = {
    "adamw": _adamw, "adafactor": _adafactor,
}


def make_optimizer(
    cfg: OptimConfig,
    total_steps: int,
    decay_mask: Mask | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for ``cfg`` and its learning-rate schedule (for logging ``lr`` at a step).

    Args:
      cfg: optimizer section of the run config.
      total_steps: training steps, the horizon of decaying schedules.
      decay_mask: where weight decay applies (or params -> bools); None: :func:`default_decay_mask`
        with ``cfg.decay_norms_and_biases`` / ``cfg.decay_embeddings``.
    """
    schedule = make_schedule(cfg, total_steps)
    if decay_mask is None:
        def decay_mask(params):
            return default_decay_mask(params, cfg.decay_norms_and_biases, cfg.decay_embeddings)
    chain = [optax.clip_by_global_norm(cfg.clip_grad_norm)] if cfg.clip_grad_norm else []
    chain.append(OPTIMIZERS[cfg.name](cfg, schedule, decay_mask))
    return optax.chain(*chain), schedule

