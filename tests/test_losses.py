import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from llmjax.losses import cross_entropy_with_z_loss


def test_hand_computed_tiny_vocab():
    # One sequence of two tokens over a vocab of 3; second token weighted 0.5.
    logits = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, np.log(2.0)]]], np.float32)
    targets = np.array([[2, 0]])
    weights = np.array([[1.0, 0.5]], np.float32)
    # token 1: Z = e + e^2 + e^3, loss = log Z - 3
    z1 = np.e + np.e ** 2 + np.e ** 3
    # token 2: Z = 1 + 1 + 2 = 4, loss = log 4 - 0
    z2 = 4.0
    ce = (np.log(z1) - 3.0) * 1.0 + np.log(z2) * 0.5
    zl = 1e-2 * (np.log(z1) ** 2 * 1.0 + np.log(z2) ** 2 * 0.5)
    sum_loss, sum_z, sum_w = cross_entropy_with_z_loss(logits, targets, weights, z_loss=1e-2)
    np.testing.assert_allclose(float(sum_z), zl, rtol=1e-6)
    np.testing.assert_allclose(float(sum_loss), ce + zl, rtol=1e-6)
    assert float(sum_w) == 1.5


def test_matches_optax_and_is_fp32_stable():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 30 + 1000.0  # huge offsets: needs max-shift
    targets = rng.integers(0, 11, size=(2, 5))
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    reference = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(targets))
    ours, sum_z, sum_w = cross_entropy_with_z_loss(logits, targets, weights)
    assert np.isfinite(float(ours))
    np.testing.assert_allclose(float(ours), float(jnp.sum(reference * weights)), rtol=1e-5)
    assert float(sum_z) == 0.0 and float(sum_w) == weights.sum()


def test_bf16_logits_are_upcast():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 7)), jnp.bfloat16)
    out = cross_entropy_with_z_loss(logits, jnp.array([[1, 2, 3]]), jnp.ones((1, 3)), z_loss=1e-4)
    assert all(x.dtype == jnp.float32 for x in out)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.array([[1, 2, 3]]))
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), -1)
    np.testing.assert_allclose(float(out[0]), float(expected.sum() + 1e-4 * jnp.sum(lse ** 2)), rtol=1e-6)


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_matches_torch(smoothing):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, 9)).astype(np.float32)
    targets = rng.integers(0, 9, size=(2, 4))
    weights = np.ones((2, 4), np.float32)
    reference = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, 9), torch.tensor(targets).reshape(-1),
        label_smoothing=smoothing, reduction="sum")
    ours, _, _ = cross_entropy_with_z_loss(logits, targets, weights, label_smoothing=smoothing)
    np.testing.assert_allclose(float(ours), reference.item(), rtol=1e-5)


def test_sums_normalize_across_microbatches():
    # Splitting a batch and normalizing the summed pieces by the summed weights = the whole batch mean.
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 6, 13)).astype(np.float32)
    targets = rng.integers(0, 13, size=(4, 6))
    weights = np.zeros((4, 6), np.float32)
    weights[0, :6] = 1
    weights[1:, :2] = 1  # uneven token counts per row
    whole, _, whole_w = cross_entropy_with_z_loss(logits, targets, weights)
    parts = [cross_entropy_with_z_loss(logits[i:i + 2], targets[i:i + 2], weights[i:i + 2]) for i in (0, 2)]
    accumulated = sum(p[0] for p in parts) / sum(p[2] for p in parts)
    np.testing.assert_allclose(float(accumulated), float(whole / whole_w), rtol=1e-6)


def test_gradient_of_z_loss_pulls_log_partition_to_zero():
    logits = jnp.full((1, 1, 4), 2.0)  # log Z = 2 + log 4 > 0
    grad = jax.grad(lambda x: cross_entropy_with_z_loss(x, jnp.array([[0]]), jnp.ones((1, 1)), z_loss=1.0)[1])(logits)
    # d/dx z*(logZ)^2 = 2 z logZ softmax(x) = 2 * (2 + log 4) * 0.25 per logit
    np.testing.assert_allclose(np.asarray(grad)[0, 0], np.full(4, 2 * (2 + np.log(4)) * 0.25), rtol=1e-6)
