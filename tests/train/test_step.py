"""The train step: accumulation equals one big batch, every mesh gives the same run, NaN updates are discarded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax import sharding
from llmjax.models import build_model, init_params
from llmjax.train.lm_loss import lm_loss_fn
from llmjax.train.state import init_train_state, trainable_matching, train_everything
from llmjax.train.step import compile_step, finish_eval, make_eval_step, make_train_step, split_microbatches
from tests.train.helpers import TINY, random_batch

MESHES = {
    "1 device": dict(data=1, fsdp=1, tensor=1, devices=1),
    "data=8": dict(data=8, fsdp=1, tensor=1),
    "fsdp=8": dict(data=1, fsdp=8, tensor=1),
    "data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2),
    "tensor=8": dict(data=1, fsdp=1, tensor=8),
}


def _mesh(spec):
    spec = dict(spec)
    count = spec.pop("devices", None)
    return sharding.make_mesh(**spec, devices=jax.devices()[:count] if count else None)


@functools.lru_cache(maxsize=None)
def _initial_params(family):
    # One random init per family, placed onto each mesh: cheaper than compiling an init per mesh.
    model = build_model(TINY[family])
    return model, jax.device_get(init_params(model, jax.random.PRNGKey(0)))


def _run(family, mesh, batches, tx, microbatches=1, is_trainable=train_everything):
    """Train on ``batches``; returns (per-step metrics on host, final state on host)."""
    model, params = _initial_params(family)
    state, shardings = init_train_state(model, tx, is_trainable, 0, mesh, params=params)
    step = compile_step(
        make_train_step(lm_loss_fn(model, z_loss=1e-4), tx, microbatches=microbatches),
        updates_state=True, state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh),
    )
    history = []
    with sharding.activate(mesh):
        for batch in batches:
            state, metrics = step(state, sharding.shard_batch(batch, mesh))
            history.append(jax.device_get(metrics))
    return history, jax.device_get(state)


def _max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_split_microbatches_is_strided():
    batch = {"x": np.arange(12).reshape(6, 2)}
    micro = split_microbatches(batch, 3)["x"]
    assert micro.shape == (3, 2, 2)
    np.testing.assert_array_equal(micro[1], [[2, 3], [8, 9]])  # rows 1 and 4


@pytest.mark.parametrize("family", [pytest.param("t5", marks=pytest.mark.slow), "decoder"])
def test_accumulated_microbatches_equal_one_big_batch(family):
    # Uneven padding per row: a per-microbatch mean would differ from the token-weighted mean.
    batches = [random_batch(family, 8, seed=s) for s in range(2)]
    mesh = _mesh(MESHES["1 device"])
    tx = optax.sgd(0.5)  # SGD: parameters move by the gradient itself, so equal params mean equal grads
    big, big_state = _run(family, mesh, batches, tx, microbatches=1)
    small, small_state = _run(family, mesh, batches, tx, microbatches=4)
    for b, s, batch in zip(big, small, batches):
        assert abs(b["loss"] - s["loss"]) <= 1e-5
        assert abs(b["grad_norm"] - s["grad_norm"]) <= 1e-5
        assert b["tokens"] == s["tokens"] == batch["decoder_loss_weights"].sum()
    assert _max_abs_diff(big_state.params, small_state.params) <= 1e-5
    assert _max_abs_diff(big_state.params, jax.device_get(_run(family, mesh, [], tx)[1].params)) > 1e-3


def test_accumulated_step_equals_a_hand_written_token_mean_loss():
    """One k=4 step against plain jax.grad of the token-mean loss over the whole batch, then SGD by hand."""
    family, z_loss, learning_rate = "decoder", 1e-4, 0.5
    model, params = _initial_params(family)
    batch = random_batch(family, 8, seed=3)
    weights = batch["decoder_loss_weights"].astype(np.float32)
    # The strided microbatches (rows i, i + 4) hold different numbers of target tokens, so a mean of
    # microbatch means weights tokens unequally and cannot match.
    assert len({int(weights[i::4].sum()) for i in range(4)}) == 4

    def token_mean_loss(p):
        logits = model.apply({"params": p}, batch["decoder_input_tokens"]).astype(jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
        cross_entropy = ((log_z - target_logit) * weights).sum() / weights.sum()
        return cross_entropy + z_loss * (log_z**2 * weights).sum() / weights.sum(), cross_entropy

    (objective, cross_entropy), grads = jax.jit(jax.value_and_grad(token_mean_loss, has_aux=True))(params)
    expected = jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params, grads)

    history, state = _run(family, _mesh(MESHES["1 device"]), [batch], optax.sgd(learning_rate), microbatches=4)
    assert history[0]["tokens"] == weights.sum()
    assert abs(history[0]["loss"] - float(cross_entropy)) <= 1e-5
    assert abs(history[0]["objective"] - float(objective)) <= 1e-5
    assert abs(history[0]["grad_norm"] - float(optax.global_norm(grads))) <= 1e-5
    assert _max_abs_diff(state.params, expected) <= 1e-6
    assert _max_abs_diff(expected, params) > 1e-2  # the step moved the params far beyond the tolerance


@pytest.mark.parametrize("family", [pytest.param("t5", marks=pytest.mark.slow), "decoder"])  # T5: ~30 s
def test_every_mesh_gives_the_same_training_run(family):
    first, second = random_batch(family, 8, seed=0), random_batch(family, 8, seed=1)
    batches = [first, second, first, second, first]
    tx = optax.adamw(3e-3, weight_decay=0.01)
    runs = {name: _run(family, _mesh(spec), batches, tx) for name, spec in MESHES.items()}
    ref_history, ref_state = runs["1 device"]
    assert ref_history[4]["loss"] < ref_history[0]["loss"] - 0.01  # it trains (same batch, steps 1 and 5)
    for name, (history, state) in runs.items():
        losses = np.array([m["loss"] for m in history])
        np.testing.assert_allclose(losses, [m["loss"] for m in ref_history], rtol=0, atol=1e-5, err_msg=name)
        # The moments (gradient averages) agree to 1e-5; the params get 1e-4 (lr / 30): Adam moves a weight
        # whose gradient is near eps by ~lr * g / eps, so a 1e-9 rounding difference between meshes moves
        # it by a fraction of lr (scanned layers reduce in another order: 4e-5 seen on tensor=8, while
        # their one-step gradients agree to 3e-8).
        assert _max_abs_diff(state.params, ref_state.params) <= 1e-4, name
        assert _max_abs_diff(state.opt_state, ref_state.opt_state) <= 1e-5, name


def test_nan_update_is_discarded_and_counted():
    family = "decoder"
    good = random_batch(family, 8, seed=0)
    bad = dict(good, decoder_loss_weights=good["decoder_loss_weights"].astype(np.float32))
    bad["decoder_loss_weights"][0, 0] = np.nan
    mesh = _mesh(MESHES["1 device"])
    tx = optax.adamw(1e-3)
    history, state = _run(family, mesh, [good, bad, good], tx)
    only_good, good_state = _run(family, mesh, [good, good], tx)
    assert [m["finite"] for m in history] == [1.0, 0.0, 1.0]
    assert np.isnan(history[1]["loss"])
    assert int(state.step) == 3 and int(state.skipped_steps) == 1
    assert history[2]["skipped_steps"] == 1
    # Params and optimizer state skipped the NaN step entirely (the rng differs by step, unused here).
    assert _max_abs_diff(state.params, good_state.params) == 0.0
    assert _max_abs_diff(state.opt_state, good_state.opt_state) == 0.0


def test_frozen_params_never_change_and_have_no_optimizer_state():
    family = "decoder"
    batches = [random_batch(family, 8, seed=s) for s in range(2)]
    model = build_model(TINY[family])
    is_trainable = trainable_matching(r"^lm_head/", r"final_norm")
    tx = optax.adamw(1e-2)
    _, initial = _run(family, _mesh(MESHES["1 device"]), [], tx, is_trainable=is_trainable)
    history, state = _run(family, _mesh(MESHES["fsdp=8"]), batches, tx, is_trainable=is_trainable)
    assert set(state.params) == {"lm_head", "final_norm"}
    assert "lm_head" not in state.frozen_params and "embed" in state.frozen_params
    opt_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
    assert opt_paths and not any("layers_0" in p or "embed" in p for p in opt_paths)
    assert _max_abs_diff(state.frozen_params, initial.frozen_params) == 0.0
    assert _max_abs_diff(state.params, initial.params) > 0.0
    del model, history


def test_eval_step_sums_over_batches_to_the_token_mean():
    family = "t5"
    model = build_model(TINY[family])
    mesh = _mesh(MESHES["data=8"])
    tx = optax.adamw(1e-3)
    state, shardings = init_train_state(model, tx, train_everything, 0, mesh)
    loss_fn = lm_loss_fn(model)
    eval_step = compile_step(make_eval_step(loss_fn), updates_state=False, state_shardings=shardings,
                             batch_sharding=sharding.batch_sharding(mesh))
    batches = [random_batch(family, 8, seed=s) for s in range(3)]
    with sharding.activate(mesh):
        sums = [jax.device_get(eval_step(state, sharding.shard_batch(b, mesh))) for b in batches]
    total = {k: sum(float(s[k]) for s in sums) for k in sums[0]}
    means = finish_eval(total)
    # Reference: one forward over all rows at once, token-weighted mean cross-entropy by hand.
    params = jax.device_get(state.full_params())
    every = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    logits = jax.jit(model.apply)({"params": params}, every["encoder_input_tokens"], every["decoder_input_tokens"],
                                  attention_mask=(every["encoder_input_tokens"] != 0).astype(np.int32))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -np.take_along_axis(np.asarray(logp), every["decoder_target_tokens"][..., None], -1)[..., 0]
    w = every["decoder_loss_weights"]
    assert means["tokens"] == w.sum()
    assert abs(means["loss"] - (nll * w).sum() / w.sum()) <= 1e-5


def test_bf16_compute_keeps_fp32_master_weights_and_loss():
    import dataclasses

    family = "t5"
    model = build_model(dataclasses.replace(TINY[family], dtype="bfloat16"))
    mesh = _mesh(MESHES["data=2,fsdp=2,tensor=2"])
    tx = optax.adamw(3e-3)
    state, shardings = init_train_state(model, tx, train_everything, 0, mesh, params=_initial_params(family)[1])
    step = compile_step(make_train_step(lm_loss_fn(model), tx), updates_state=True,
                        state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh))
    batch = random_batch(family, 8)
    with sharding.activate(mesh):
        losses = []
        for _ in range(4):
            state, metrics = step(state, sharding.shard_batch(batch, mesh))
            losses.append(metrics["loss"])
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert losses[0].dtype == jnp.float32 and float(losses[-1]) < float(losses[0])
    # The fp32 model's loss on the same params: bf16 rounding moves it, but not far.
    fp32_history, _ = _run(family, _mesh(MESHES["1 device"]), [batch], tx)
    assert 0 < abs(float(losses[0]) - fp32_history[0]["loss"]) < 0.02
