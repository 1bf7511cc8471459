"""Scanned vs unrolled layer stacks (``llmjax/models/scan.py``) and remat policies, for both families.

Each comparison builds the same model twice, ``scan_layers`` on and off, with the same weights
(``stack_layers`` of the unrolled init): logits, the Hugging Face export, and 5 optimizer steps of the
real train step must agree; every remat policy must give the gradients of ``none``.
"""

from __future__ import annotations

import dataclasses
import filecmp
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import hf, sharding
from llmjax.config import OptimConfig
from llmjax.model_config import REMAT_POLICY_NAMES
from llmjax.models import (
    DecoderConfig, T5Config, build_model, family_of, init_params, stack_layers, unstack_layers,
)
from llmjax.train.lm_loss import lm_loss_fn
from llmjax.train.optim import make_optimizer
from llmjax.train.state import init_train_state, train_everything
from llmjax.train.step import compile_step, make_train_step
from tests.train.helpers import random_batch

# Encoder and decoder stacks of different depths, so a mix-up of the two cannot pass.
CONFIGS = {
    "t5": T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "decoder": DecoderConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1),
}


def unrolled(config):
    return dataclasses.replace(config, scan_layers=False)


@functools.lru_cache(maxsize=None)
def weights(family: str) -> dict:
    """Unrolled params on the host (one init per family)."""
    return jax.device_get(init_params(build_model(unrolled(CONFIGS[family])), jax.random.key(0)))


def model_inputs(family: str, batch: dict) -> tuple:
    if family == "t5":
        return batch["encoder_input_tokens"], batch["decoder_input_tokens"], \
            (batch["encoder_input_tokens"] != 0).astype(np.int32)
    return batch["decoder_input_tokens"], (batch["decoder_input_tokens"] != 0).astype(np.int32)


def max_abs_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree_util.tree_leaves(diffs))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_scanned_tree_is_the_stacked_unrolled_tree(family):
    config = CONFIGS[family]
    params = weights(family)
    scanned = jax.eval_shape(lambda: init_params(build_model(config), jax.random.key(0)))
    stacked = stack_layers(params, config)
    shape = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert shape(scanned) == shape(stacked)
    root = stacked["decoder"] if family == "t5" else stacked
    assert "layers_0" not in root and jax.tree_util.tree_leaves(root["layers"])[0].shape[0] == 3
    back = unstack_layers(stacked, config)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    assert max_abs_diff(back, params) == 0.0
    # A fresh scanned init draws every layer separately (split "params" rngs), not one layer repeated.
    fresh = init_params(build_model(config), jax.random.key(1))
    layers = (fresh["decoder"] if family == "t5" else fresh)["layers"]
    q = np.asarray(layers["self_attention"]["q"]["kernel"])
    assert np.abs(q[0] - q[1]).max() > 1e-3


def test_stack_and_unstack_refuse_the_wrong_layout():
    config = CONFIGS["decoder"]
    stacked = stack_layers(weights("decoder"), config)
    with pytest.raises(ValueError, match=r"stack_layers: expected layers_0..layers_2 under the top level"):
        stack_layers(stacked, config)
    with pytest.raises(ValueError, match=r"unstack_layers: no 'layers' under the top level"):
        unstack_layers(weights("decoder"), config)
    with pytest.raises(ValueError, match=r"config has 4 layers but the stacked leaves have leading axes \[3\]"):
        unstack_layers(stacked, dataclasses.replace(config, num_hidden_layers=4))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_scan_on_and_off_give_the_same_logits(family):
    config = CONFIGS[family]
    inputs = model_inputs(family, random_batch(family, 4, seed=1))
    forward = jax.jit(lambda model, p: model.apply({"params": p}, *inputs), static_argnums=0)
    off = forward(build_model(unrolled(config)), weights(family))
    on = forward(build_model(config), stack_layers(weights(family), config))
    assert np.abs(np.asarray(off)).max() > 0.1  # logits are not trivially zero
    assert max_abs_diff(on, off) <= 1e-5


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_scan_on_and_off_export_bitwise_identical_hf_dirs(family, tmp_path):
    config = CONFIGS[family]
    hf.save_pretrained(build_model(unrolled(config)), weights(family), tmp_path / "off")
    hf.save_pretrained(build_model(config), stack_layers(weights(family), config), tmp_path / "on")
    files = sorted(p.name for p in (tmp_path / "off").iterdir())
    assert "model.safetensors" in files and files == sorted(p.name for p in (tmp_path / "on").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "off", tmp_path / "on", files, shallow=False)
    assert mismatch == [] and errors == [] and match == files
    # Reading it back gives either layout, as the config asks.
    model, params = hf.from_pretrained(tmp_path / "on")
    assert model.config.scan_layers and max_abs_diff(params, stack_layers(weights(family), config)) == 0.0
    model, params = hf.from_pretrained(tmp_path / "on", scan_layers=False)
    assert not model.config.scan_layers and max_abs_diff(params, weights(family)) == 0.0


def train(family: str, config, optimizer: str, steps: int = 5):
    """``steps`` steps of the real train step and optimizer; -> (losses, final params unrolled, on host)."""
    model = build_model(config)
    params = weights(family) if not config.scan_layers else stack_layers(weights(family), config)
    # Weight decay on and a clip that binds: both see whole leaves, where scan could change the result.
    # Learning rate 1e-3: Adam's first update is lr * g / (|g| + eps), so for a gradient entry near eps
    # a float-rounding difference in g (scan sums in another order) moves that weight by a fraction of
    # lr (seen: 2.5e-3 * lr on one entry, constant over the steps); 1e-3 keeps that below the 1e-5 bound.
    tx, _ = make_optimizer(OptimConfig(name=optimizer, learning_rate=1e-3, schedule="constant", weight_decay=0.1,
                                       clip_grad_norm=0.5), total_steps=steps)
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    state, shardings = init_train_state(model, tx, train_everything, 0, mesh, params=params)
    step = compile_step(make_train_step(lm_loss_fn(model, z_loss=1e-4), tx), updates_state=True,
                        state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh))
    losses = []
    with sharding.activate(mesh):
        for seed in range(steps):
            state, metrics = step(state, sharding.shard_batch(random_batch(family, 4, seed=seed), mesh))
            losses.append(float(metrics["loss"]))
    final = jax.device_get(state.params)
    return losses, unstack_layers(final, config) if config.scan_layers else final


@pytest.mark.parametrize("family, optimizer", [("t5", "adamw"), ("decoder", "adamw"),
                                               pytest.param("t5", "adafactor", marks=pytest.mark.slow)])
def test_scan_on_and_off_train_the_same(family, optimizer):
    losses_off, params_off = train(family, unrolled(CONFIGS[family]), optimizer)
    losses_on, params_on = train(family, CONFIGS[family], optimizer)
    assert max_abs_diff(params_off, weights(family)) > 1e-3  # the steps did move the weights
    np.testing.assert_allclose(losses_on, losses_off, atol=1e-5)
    assert max_abs_diff(params_on, params_off) <= 1e-5


@functools.partial(jax.jit, static_argnums=(0, 2))
def value_and_grad(model, params, inputs_seed):
    """A log-likelihood and its gradient, dropout on (rng fixed): remat must replay the same masks."""
    inputs = model_inputs(family_of(model.config), random_batch(family_of(model.config), 4, seed=inputs_seed))

    def loss(p):
        logits = model.apply({"params": p}, *inputs, deterministic=False, rngs={"dropout": jax.random.key(3)})
        return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

    return jax.value_and_grad(loss)(params)


def assert_same_gradients(config, params, policies):
    value, grads = value_and_grad(build_model(config), params, 2)
    for policy in policies:
        value_p, grads_p = value_and_grad(build_model(dataclasses.replace(config, remat_policy=policy)), params, 2)
        assert abs(float(value_p - value)) <= 1e-6, policy
        assert max_abs_diff(grads_p, grads) <= 1e-6, policy


@pytest.mark.parametrize("family", [f if f != "t5" else pytest.param(f, marks=pytest.mark.slow)  # T5: ~20 s
                                    for f in sorted(CONFIGS)])
def test_every_remat_policy_gives_the_gradients_of_none(family):
    # The decoder with attention dropout; T5 without (its dropout makes each compile ~5x slower; the
    # next test covers it), which leaves the policies' saving and recomputing to compare.
    dropout = {"dropout_rate": 0.0} if family == "t5" else {"attention_dropout": 0.2}
    config = dataclasses.replace(CONFIGS[family], **dropout)
    assert_same_gradients(config, stack_layers(weights(family), config), REMAT_POLICY_NAMES[1:])
    # Remat also wraps unrolled layers.
    assert_same_gradients(unrolled(config), weights(family), ["save_dots_no_batch"])


@pytest.mark.slow  # T5 with dropout compiles ~5x slower (~20 s)
def test_full_remat_replays_t5_dropout():
    config = dataclasses.replace(CONFIGS["t5"], dropout_rate=0.2)
    params = stack_layers(weights("t5"), config)
    assert_same_gradients(config, params, ["full"])
    # Premise: dropout is on, so a replay with other masks would show.
    off = value_and_grad(build_model(dataclasses.replace(config, dropout_rate=0.0)), params, 2)[0]
    assert abs(float(value_and_grad(build_model(config), params, 2)[0] - off)) > 1e-4


@pytest.mark.parametrize("config_class", [T5Config, DecoderConfig])
def test_unknown_remat_policy_is_refused_with_the_choices(config_class):
    with pytest.raises(ValueError, match=r"remat_policy='dots' is not a remat policy; use one of \['none', 'full'"):
        config_class(remat_policy="dots")


def test_remat_policies_registry_matches_config_names():
    from llmjax.models.scan import REMAT_POLICIES

    assert ["none", *REMAT_POLICIES] == list(REMAT_POLICY_NAMES)
