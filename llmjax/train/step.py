"""The train step and the eval step: pure functions, jitted in one place (``compile_step``).

``train_step(state, batch) -> (state, metrics)``:
  1. ``rng = fold_in(state.rng, state.step)``: a step's randomness depends on the
     step number only, so a resumed run draws the same dropout masks.
  2. Gradients of the loss SUM (see ``llmjax.train.lm_loss``) over ``microbatches``
     slices of the batch, accumulated with ``lax.scan``, then divided by the total
     number of target tokens of the whole batch. Hence k microbatches give the same
     update as one big batch (a mean per microbatch would over-weight short ones).
  3. One optimizer update of the trainable params. If the loss or the gradient
     norm is not finite the update is discarded: params and optimizer state stay
     as they were, ``step`` and ``skipped_steps`` advance, and ``metrics["finite"]``
     is 0 so the loop can apply its NaN policy (skip and log, or abort).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from llmjax.train.state import TrainState, merge_params

Metrics = dict
LossFn = Callable[[dict, dict, "jax.Array | None"], tuple[jax.Array, dict]]
"""``loss_fn(params, batch, rng) -> (objective_sum, sums)``.

* ``params``: the full parameter tree (trainable and frozen merged).
* ``batch``: dict of ``[batch, length]`` arrays (one microbatch under accumulation).
* ``rng``: a key for dropout, or None for evaluation (deterministic).
* ``objective_sum``: fp32 scalar, the quantity differentiated, a SUM over tokens
  (not a mean), so microbatches add up exactly.
* ``sums``: dict of fp32 scalars, also sums; ``sums["weights"]`` is the normalizer
  (number of target tokens). The step divides the gradient and every entry by the
  total ``weights`` of the whole batch.
"""


def split_microbatches(batch: dict, microbatches: int) -> dict:
    """``[B, ...]`` features -> ``[microbatches, B // microbatches, ...]``.

    Microbatch ``i`` takes rows ``i, i + k, i + 2k, ...``: a strided split keeps every
    microbatch spread over all data-parallel shards of the batch dimension. ``B`` divides by
    ``microbatches`` (``RunConfig`` checks it where the batch size enters).
    """
    size = next(iter(batch.values())).shape[0]

    def split(x):
        x = x.reshape((size // microbatches, microbatches) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return {name: split(x) for name, x in batch.items()}


def _summed_grads(loss_fn: LossFn, params, frozen, batch, rng, microbatches: int):
    """Gradient of the summed objective and the summed loss statistics over all microbatches."""

    def objective(p, mb, r):
        return loss_fn(merge_params(p, frozen), mb, r)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if microbatches == 1:
        (objective_sum, sums), grads = grad_fn(params, batch, rng)
        return objective_sum, sums, grads

    micro = split_microbatches(batch, microbatches)

    def body(carry, xs):
        index, mb = xs
        (obj, sums), grads = grad_fn(params, mb, jax.random.fold_in(rng, index))
        acc_obj, acc_sums, acc_grads = carry
        add = lambda a, b: a + b.astype(a.dtype)  # noqa: E731
        return (acc_obj + obj, jax.tree_util.tree_map(add, acc_sums, sums),
                jax.tree_util.tree_map(add, acc_grads, grads)), None

    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    sums_shape = jax.eval_shape(lambda: objective(params, first, rng)[1])
    zeros = lambda t: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), t)  # noqa: E731
    init = (jnp.zeros((), jnp.float32), zeros(sums_shape), zeros(params))
    (objective_sum, sums, grads), _ = jax.lax.scan(body, init, (jnp.arange(microbatches), micro))
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
    return objective_sum, sums, grads


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    microbatches: int = 1,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    epochs: int = 1,
    minibatches: int = 1,
) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
    """The pure (un-jitted) train step; see the module docstring. Jit it with ``compile_step``.

    Metrics (fp32 scalars): ``loss`` and ``z_loss`` per target token, every other entry
    of the loss function's ``sums`` per target token, ``objective`` (loss + z_loss),
    ``grad_norm`` (before clipping), ``learning_rate`` (of this update),
    ``tokens`` (target tokens), ``finite`` (1/0), ``skipped_steps``.

    ``epochs`` x ``minibatches`` > 1 (PPO's inner loop): the step makes that many optimizer updates on its
    batch: each epoch draws a permutation of the rows from the step's key and splits it into ``minibatches``
    equal parts (the batch size divides by ``minibatches``), each one update (with its own ``microbatches``
    accumulation). Metrics are then the means over the updates (``tokens``: their sum; ``finite``: 1 only if
    every update was finite); ``skipped_steps`` counts discarded updates, and ``state.step`` still advances
    by one per call.
    """
    if microbatches < 1 or epochs < 1 or minibatches < 1:
        raise ValueError(f"train.microbatches, epochs and minibatches must be >= 1, got "
                         f"{microbatches}, {epochs}, {minibatches}")

    def update(state: TrainState, batch: dict, rng: jax.Array):
        """One optimizer update on ``batch``: (params, opt_state, skipped increment, metrics)."""
        objective_sum, sums, grads = _summed_grads(
            loss_fn, state.params, state.frozen_params, batch, rng, microbatches
        )
        # A batch without target tokens gives zero gradients rather than 0/0.
        tokens = sums["weights"]
        denominator = jnp.maximum(tokens, 1e-8)
        grads = jax.tree_util.tree_map(lambda g: g / denominator.astype(g.dtype), grads)
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        objective = objective_sum / denominator
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
        keep_new = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree_util.tree_map(keep_new, new_params, state.params)
        opt_state = jax.tree_util.tree_map(keep_new, new_opt_state, state.opt_state)
        metrics = {name: value / denominator for name, value in sums.items() if name != "weights"}
        metrics.update(objective=objective, grad_norm=grad_norm, tokens=tokens, finite=finite.astype(jnp.float32))
        return params, opt_state, jnp.where(finite, 0, 1).astype(jnp.int32), metrics

    def finish(state, params, opt_state, skipped, metrics, updates_done):
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  skipped_steps=state.skipped_steps + skipped)
        metrics["skipped_steps"] = new_state.skipped_steps
        if learning_rate_fn is not None:
            # Skipped updates leave the optimizer's own count behind, so its schedule does too.
            metrics["learning_rate"] = learning_rate_fn(updates_done - state.skipped_steps)
        return new_state, metrics

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        params, opt_state, skipped, metrics = update(state, batch, rng)
        return finish(state, params, opt_state, skipped, metrics, state.step)

    count = epochs * minibatches
    if count == 1:
        return train_step

    def multi_update_step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        size = next(iter(batch.values())).shape[0]
        if size % minibatches:
            raise ValueError(f"a batch of {size} rows does not split into {minibatches} minibatches")

        def one_update(carry, index):
            params, opt_state, skipped = carry
            epoch, part = index // minibatches, index % minibatches
            order = jax.random.permutation(jax.random.fold_in(rng, epoch), size)
            rows = jax.lax.dynamic_slice_in_dim(order, part * (size // minibatches), size // minibatches)
            minibatch = jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0), batch)
            current = state.replace(params=params, opt_state=opt_state)
            params, opt_state, bad, metrics = update(current, minibatch, jax.random.fold_in(rng, count + index))
            return (params, opt_state, skipped + bad), metrics

        init = (state.params, state.opt_state, jnp.zeros((), jnp.int32))
        (params, opt_state, skipped), stacked = jax.lax.scan(one_update, init, jnp.arange(count))
        metrics = {name: jnp.mean(values) for name, values in stacked.items()}
        metrics["tokens"] = jnp.sum(stacked["tokens"])
        metrics["finite"] = jnp.min(stacked["finite"])
        return finish(state, params, opt_state, skipped, metrics, (state.step + 1) * count - 1)

    return multi_update_step


def make_eval_step(loss_fn: LossFn) -> Callable[[TrainState, dict], Metrics]:
    """``(state, batch) -> sums``: the loss sums of one batch, deterministic (no dropout).

    Sums, not means, so the caller adds them over an eval set and divides once
    (``finish_eval``).
    """

    def eval_step(state: TrainState, batch: dict) -> Metrics:
        _, sums = loss_fn(state.full_params(), batch, None)
        return sums

    return eval_step


def finish_eval(total_sums: dict) -> Metrics:
    """Summed eval statistics -> per-token means (``tokens`` keeps the count)."""
    tokens = total_sums["weights"]
    means = {name: value / max(tokens, 1e-8) for name, value in total_sums.items() if name != "weights"}
    means["tokens"] = tokens
    return means


def compile_step(
    step_fn: Callable,
    *,
    updates_state: bool,
    state_shardings=None,
    batch_sharding=None,
) -> Callable:
    """The one place steps are jitted: ``step_fn(state, batch)`` with shardings and donation.

    ``updates_state``: True for a train step (returns ``(state, metrics)``; the input
    state is donated, so its buffers are reused for the output state and the caller
    must not touch the old state after the call), False for an eval step.
    ``state_shardings``: a ``TrainState`` of ``NamedSharding`` (``llmjax.train.state.state_shardings``);
    ``batch_sharding``: one ``NamedSharding`` for every feature. The output state keeps
    the state's shardings; metrics are replicated scalars.
    """
    kwargs = {}
    if state_shardings is not None:
        kwargs["in_shardings"] = (state_shardings, batch_sharding)
    if updates_state:
        kwargs["donate_argnums"] = (0,)
        if state_shardings is not None:
            kwargs["out_shardings"] = (state_shardings, None)
    return jax.jit(step_fn, **kwargs)
