"""Token-level cross-entropy with z-loss and label smoothing, in fp32. Pure functions.

Losses come back as *sums* with the total weight beside them, so gradient accumulation over
microbatches normalizes once by the number of target tokens in the whole batch (not per microbatch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_with_z_loss(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted token cross-entropy plus ``z_loss * log(Z)^2`` (PaLM / t5x), all in fp32.

    Args:
      logits: ``[batch, length, vocab]`` (any float dtype; upcast to fp32).
      targets: ``[batch, length]`` int target ids.
      weights: ``[batch, length]`` per-token loss weights (``decoder_loss_weights``; 0 masks padding).
      z_loss: coefficient of the squared log-partition penalty that keeps logits from drifting.
      label_smoothing: mass spread uniformly over the whole vocabulary (the target included), as
        ``torch.nn.functional.cross_entropy(label_smoothing=...)`` and ``optax.smooth_labels`` do.

    Returns:
      ``(sum_loss, sum_z_loss, sum_weights)`` fp32 scalars: ``sum_loss`` is the weighted sum of
      cross-entropy + z-loss per token (what to minimize), ``sum_z_loss`` its z-loss part (for logging),
      ``sum_weights`` the total weight (normalize by it after summing over microbatches).
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)                      # [b, t]; max-shifted, stable
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    token_loss = log_z - target_logits                            # -log p(target)
    if label_smoothing:
        uniform_loss = log_z - jnp.mean(logits, axis=-1)          # -mean_v log p(v)
        token_loss = (1.0 - label_smoothing) * token_loss + label_smoothing * uniform_loss
    token_z_loss = z_loss * jnp.square(log_z)
    sum_z_loss = jnp.sum(token_z_loss * weights)
    sum_loss = jnp.sum(token_loss * weights) + sum_z_loss
    return sum_loss, sum_z_loss, jnp.sum(weights)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    temperature: float,
    alpha: float,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict]:
    """Knowledge distillation (Hinton et al. 2015) per target token, weighted and summed, in fp32:

    ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, targets)``

    plus the student's z-loss (``z_loss * log(Z)^2`` at T = 1, unscaled by ``alpha``: it keeps the logits from
    drifting whatever the mix). ``T^2`` keeps the soft targets' gradients on the scale of the hard ones as T
    grows. The teacher's logits are constants (``stop_gradient``): no gradient reaches the teacher.

    Args:
      student_logits, teacher_logits: ``[batch, length, vocab]`` (any float dtype; upcast to fp32), same shape.
      targets: ``[batch, length]`` int label ids; weights: ``[batch, length]`` loss weights (0 masks padding).
      temperature: T > 0; alpha: the soft targets' share in [0, 1] (0: plain cross-entropy).
      z_loss, label_smoothing: as :func:`cross_entropy_with_z_loss` (the hard-label part).

    Returns:
      ``(objective_sum, sums)``: the weighted sum of the whole per-token objective, and fp32 sums ``loss``
      (the objective less the z-loss), ``kl`` (KL at temperature T, unscaled), ``ce`` (cross-entropy with
      the labels), ``z_loss`` and ``weights`` (normalize every sum by it).
    """
    weights = weights.astype(jnp.float32)
    student = student_logits.astype(jnp.float32) / temperature
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    teacher_logp = jax.nn.log_softmax(teacher, axis=-1)
    token_kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - jax.nn.log_softmax(student, axis=-1)), axis=-1)
    sum_kl = jnp.sum(token_kl * weights)
    ce_and_z, sum_z, sum_weights = cross_entropy_with_z_loss(student_logits, targets, weights, z_loss,
                                                             label_smoothing)
    sum_ce = ce_and_z - sum_z
    sum_loss = alpha * temperature ** 2 * sum_kl + (1.0 - alpha) * sum_ce
    return sum_loss + sum_z, {"loss": sum_loss, "kl": sum_kl, "ce": sum_ce, "z_loss": sum_z, "weights": sum_weights}
