"""Optax optimizers and learning-rate schedules from an :class:`~llmjax.config.OptimConfig`.

``make_optimizer`` chains global-norm clipping and AdamW or Adafactor and applies weight decay only where
the decay mask says; with ``loraplus_lr_ratio`` (LoRA+) the updates of LoRA's ``lora_B`` matrices, weight decay
included, are that many times larger, as if their learning rate were (peft's ``create_loraplus_optimizer``).
Freezing is not the optimizer's job: the train state hands it the trainable parameters only
(``llmjax.train.state``), so a frozen base never has optimizer state. Parameters of a scanned layer stack
(leading layer axis) are optimized layer by layer (:func:`per_layer`), so a model gives the same run with
``scan_layers`` on or off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from llmjax.config import OptimConfig
from llmjax.lora.core import LORA_B
from llmjax.models.scan import STACKS, stack_of

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


def per_layer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` applied to each layer of a scanned stack as to its own leaf (``jax.vmap`` over the layer axis).

    A transformation that looks at whole leaves (Adafactor's factored moments, parameter-scale RMS and
    update clipping; the decay mask's ``ndim`` test) would otherwise treat ``[layers, ...]`` as one
    tensor; elementwise ones (AdamW) are unchanged by it. Leaves outside a stack see ``tx`` as is.
    Each stack is its own group (the encoder and decoder stacks of T5 may differ in depth).
    """
    def init(params):  # no stacked leaves (scan off): vmap would have nothing to map over
        return jax.vmap(tx.init)(params) if jax.tree_util.tree_leaves(params) else tx.init(params)

    def update(updates, state, params=None):
        if not jax.tree_util.tree_leaves(updates):
            return tx.update(updates, state, params)
        return jax.vmap(tx.update)(updates, state, params)

    layerwise = optax.GradientTransformation(init, update)

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: stack_of(path) or "single", params)

    return optax.multi_transform({"single": tx, **{stack: layerwise for stack in STACKS}}, labels)


def _restrict_to(full_mask) -> Callable:
    """A full-tree bool mask -> a callable giving the mask on whatever (pruned) tree it is handed."""
    by_path = {jax.tree_util.keystr(p): bool(v) for p, v in jax.tree_util.tree_leaves_with_path(full_mask)}

    def mask(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: by_path[jax.tree_util.keystr(p)], params)

    return mask


def scale_lora_b(tx: optax.GradientTransformation, ratio: float) -> optax.GradientTransformation:
    """LoRA+: ``tx`` with the updates of every ``lora_B`` leaf multiplied by ``ratio`` (after ``tx``, so weight decay
    scales too: their learning rate times ``ratio``, as a separate parameter group would have it). ``tx``'s state is
    kept as is, so a run may change the ratio on resume as it may change the learning rate."""
    def scale(path, update):
        return update * ratio if any(getattr(key, "key", None) == LORA_B for key in path) else update

    def update(updates, state, params=None):
        updates, state = tx.update(updates, state, params)
        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(tx.init, update)


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
    elif not callable(decay_mask):
        # per_layer hands the optimizer one group of the tree at a time (the rest as empty nodes); a
        # callable mask evaluated on that pruned tree matches it, a full-tree mask would not.
        decay_mask = _restrict_to(decay_mask)
    chain = [optax.clip_by_global_norm(cfg.clip_grad_norm)] if cfg.clip_grad_norm else []
    chain.append(per_layer(OPTIMIZERS[cfg.name](cfg, schedule, decay_mask)))
    tx = optax.chain(*chain)
    return (tx if cfg.loraplus_lr_ratio is None else scale_lora_b(tx, cfg.loraplus_lr_ratio)), schedule

