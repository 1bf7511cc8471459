import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import OptimConfig
from llmjax.train.optim import default_decay_mask, make_optimizer, make_schedule
from llmjax.train.state import create_train_state, trainable_matching


def _lr(cfg, total, step):
    return float(make_schedule(cfg, total)(step))


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "rsqrt"])
def test_warmup_is_linear_from_zero(schedule):
    cfg = OptimConfig(learning_rate=2.0, schedule=schedule, warmup_steps=10)
    assert _lr(cfg, 110, 0) == 0.0
    assert _lr(cfg, 110, 5) == pytest.approx(1.0)
    assert _lr(cfg, 110, 10) == pytest.approx(2.0)


def test_decay_values_hand_computed():
    cos = OptimConfig(learning_rate=1.0, schedule="cosine", warmup_steps=10, final_lr_fraction=0.1)
    # halfway through the 100 decay steps: 0.1 + 0.9 * (1 + cos(pi/2)) / 2
    assert _lr(cos, 110, 60) == pytest.approx(0.55)
    assert _lr(cos, 110, 35) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.25)) / 2)
    assert _lr(cos, 110, 110) == pytest.approx(0.1)
    lin = OptimConfig(learning_rate=1.0, schedule="linear", warmup_steps=10)
    assert _lr(lin, 110, 60) == pytest.approx(0.5)
    assert _lr(lin, 110, 110) == pytest.approx(0.0)
    const = OptimConfig(learning_rate=0.3, schedule="constant")
    assert _lr(const, 100, 0) == pytest.approx(0.3) and _lr(const, 100, 99) == pytest.approx(0.3)
    rsqrt = OptimConfig(learning_rate=0.01, schedule="rsqrt", warmup_steps=100)
    assert _lr(rsqrt, 1000, 400) == pytest.approx(0.01 * math.sqrt(100 / 400))  # T5: 1/sqrt(max(step, 100))
    no_warmup = OptimConfig(learning_rate=1.0, schedule="rsqrt")
    assert _lr(no_warmup, 1000, 3) == pytest.approx(0.5)  # 1/sqrt(step + 1)


def test_global_norm_clipping_hand_computed():
    # First AdamW step is lr * g / (|g| + eps) per element; with eps = 1 it depends on g's scale,
    # so the clipped gradient g * 1/|g|_2 is visible in the update.
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.array([3.0, 4.0])}  # global norm 5
    for clip, g in ((1.0, np.array([0.6, 0.8])), (None, np.array([3.0, 4.0])), (10.0, np.array([3.0, 4.0]))):
        cfg = OptimConfig(learning_rate=1.0, schedule="constant", eps=1.0, clip_grad_norm=clip)
        tx, _ = make_optimizer(cfg, 10)
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(np.asarray(updates["w"]), -g / (np.abs(g) + 1.0), rtol=1e-5)


def test_loraplus_scales_the_b_matrices_updates_hand_computed():
    # LoRA+: lora_B's learning rate is ratio x the rest's. With eps = 1 the first AdamW step is
    # -lr * (g / (|g| + 1) + wd * w) per element (decoupled decay, masked to matrices): lora_B's is ratio times it,
    # decay included (as peft's create_loraplus_optimizer's parameter group), lora_A's and the rest's unchanged.
    params = {"q": {"lora_A": jnp.full((3, 2), 0.5), "lora_B": jnp.full((2, 3), 0.25)}, "w": jnp.full((3, 3), 1.0)}
    grads = {"q": {"lora_A": jnp.full((3, 2), 1.0), "lora_B": jnp.full((2, 3), 3.0)}, "w": jnp.full((3, 3), -1.0)}

    def first_step(ratio):
        cfg = OptimConfig(learning_rate=0.1, schedule="constant", eps=1.0, clip_grad_norm=None, weight_decay=0.5,
                          loraplus_lr_ratio=ratio)
        tx, _ = make_optimizer(cfg, 10)
        return tx.update(grads, tx.init(params), params)[0]

    plain, plus = first_step(None), first_step(16.0)
    # The same optimizer state either way: a run may change the ratio on resume, as it may the learning rate.
    same = [make_optimizer(OptimConfig(loraplus_lr_ratio=r), 10)[0].init(params) for r in (None, 16.0)]
    assert jax.tree_util.tree_structure(same[0]) == jax.tree_util.tree_structure(same[1])
    expected_b = -0.1 * (3.0 / 4.0 + 0.5 * 0.25)
    np.testing.assert_allclose(np.asarray(plain["q"]["lora_B"]), expected_b, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(plus["q"]["lora_B"]), 16.0 * expected_b, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(plus["q"]["lora_A"]), -0.1 * (1.0 / 2.0 + 0.5 * 0.5), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(plus["w"]), np.asarray(plain["w"]))


def _params():
    return {
        "dense": {"kernel": jnp.full((4, 3), 2.0)},
        "norm": {"scale": jnp.full((3,), 2.0)},
        "embed": {"embedding": jnp.full((5, 3), 2.0)},
    }


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
@pytest.mark.parametrize("norms,embeddings", [(False, False), (True, False), (False, True)])
def test_weight_decay_mask(name, norms, embeddings):
    # Zero gradients: the whole update is decoupled decay = -lr * wd * param where the mask allows it.
    cfg = OptimConfig(name=name, learning_rate=0.5, schedule="constant", weight_decay=0.1,
                      decay_norms_and_biases=norms, decay_embeddings=embeddings)
    params = _params()
    tx, _ = make_optimizer(cfg, 10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    expected = {"dense": True, "norm": norms, "embed": embeddings}
    for group, decays in expected.items():
        (leaf,) = updates[group].values()
        np.testing.assert_allclose(np.asarray(leaf), -0.5 * 0.1 * 2.0 if decays else 0.0, atol=1e-7)


def test_default_decay_mask():
    mask = default_decay_mask(_params())
    assert mask == {"dense": {"kernel": True}, "norm": {"scale": False}, "embed": {"embedding": False}}


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_frozen_params_hold_no_optimizer_state(name):
    # Freezing is the train state's split: the optimizer only ever sees the trainable half.
    params = {"base": {"kernel": jnp.ones((7, 5)), "scale": jnp.ones((5,))},
              "adapter": {"kernel": jnp.ones((2, 3))}}
    tx, _ = make_optimizer(OptimConfig(name=name, weight_decay=0.1), 10)
    state = create_train_state(params, tx, trainable_matching(r"^adapter/"), 0)
    assert state.frozen_params == {"base": params["base"]}
    shapes = [tuple(x.shape) for x in jax.tree.leaves(state.opt_state)]
    assert (7, 5) not in shapes and (5,) not in shapes
    # AdamW: mu and nu of the adapter; Adafactor: its (unfactored, small) second moment.
    assert shapes.count((2, 3)) == (2 if name == "adamw" else 1)
    assert sum(math.prod(s) for s in shapes) <= 2 * 6 + 8  # adapter moments + a few counters
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, state.params), state.opt_state, state.params)
    assert float(jnp.abs(updates["adapter"]["kernel"]).min()) > 0.0


def test_adafactor_factors_large_matrices():
    params = {"big": jnp.ones((256, 128)), "small": jnp.ones((8, 4))}
    tx, _ = make_optimizer(OptimConfig(name="adafactor"), 10)
    shapes = [tuple(x.shape) for x in jax.tree.leaves(tx.init(params))]
    assert (256,) in shapes and (128,) in shapes and (256, 128) not in shapes  # row/column statistics only
    assert (8, 4) in shapes  # below min_dim_size_to_factor: a full second moment
