import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from llmjax.losses import cross_entropy_with_z_loss, distillation_loss


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


# -- distillation ------------------------------------------------------------------------------------------

def _distill_case(seed=0):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(2, 3, 5)).astype(np.float32) * 2
    teacher = rng.normal(size=(2, 3, 5)).astype(np.float32) * 2
    targets = rng.integers(0, 5, size=(2, 3))
    weights = np.array([[1.0, 1.0, 0.0], [0.5, 1.0, 1.0]], np.float32)  # a padded token and a half-weight one
    return student, teacher, targets, weights


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distillation_loss_equals_the_hand_formula(alpha):
    student, teacher, targets, weights = _distill_case()
    temperature = 2.0
    p_log, q_log = _log_softmax(teacher / temperature), _log_softmax(student / temperature)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)                          # KL(teacher_T || student_T) per token
    ce = -np.take_along_axis(_log_softmax(student), targets[..., None], -1)[..., 0]  # at T = 1
    expected = (weights * (alpha * temperature ** 2 * kl + (1 - alpha) * ce)).sum()
    objective, sums = distillation_loss(student, teacher, targets, weights, temperature=temperature, alpha=alpha)
    np.testing.assert_allclose(float(objective), expected, rtol=1e-5)
    np.testing.assert_allclose(float(sums["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(sums["kl"]), (weights * kl).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(sums["ce"]), (weights * ce).sum(), rtol=1e-5)
    assert float(sums["weights"]) == 4.5 and float(sums["z_loss"]) == 0.0
    assert (weights * kl).sum() > 0.1  # the two distributions differ: the KL term is really tested


def test_distillation_at_alpha_0_is_the_label_loss_with_its_z_loss_and_smoothing():
    student, teacher, targets, weights = _distill_case(1)
    objective, sums = distillation_loss(student, teacher, targets, weights, temperature=3.0, alpha=0.0, z_loss=1e-2,
                                        label_smoothing=0.1)
    ce_and_z, z, _ = cross_entropy_with_z_loss(student, targets, weights, z_loss=1e-2, label_smoothing=0.1)
    np.testing.assert_allclose(float(objective), float(ce_and_z), rtol=1e-6)
    np.testing.assert_allclose(float(sums["z_loss"]), float(z), rtol=1e-6)
    np.testing.assert_allclose(float(sums["loss"]), float(ce_and_z - z), rtol=1e-6)


def test_t_squared_keeps_the_soft_gradient_scale_as_t_grows():
    # d(T^2 KL)/d student = T (q_T - p_T), which tends to (s - t) / V for zero-mean logits as T grows (Hinton
    # et al. 2015): the T^2 factor keeps the soft targets' gradient the same size whatever T. Without it the
    # gradient would shrink as 1 / T^2.
    student, teacher, targets, weights = _distill_case(2)
    student -= student.mean(-1, keepdims=True)
    teacher -= teacher.mean(-1, keepdims=True)

    def grad(temperature):
        loss = lambda s: distillation_loss(s, teacher, targets, weights, temperature=temperature, alpha=1.0)[0]  # noqa: E731
        return np.asarray(jax.grad(loss)(jnp.asarray(student)))

    limit = weights[..., None] * (student - teacher) / student.shape[-1]
    # The gap to the limit is O(1 / T) (0.024 at T = 50 here): it shrinks tenfold from T = 500 to T = 5000.
    np.testing.assert_allclose(grad(500.0), limit, atol=5e-3)
    np.testing.assert_allclose(grad(5000.0), limit, atol=5e-4)
    assert np.abs(limit).max() > 0.1


def test_no_gradient_reaches_the_teacher_logits():
    student, teacher, targets, weights = _distill_case(3)

    def loss(s, t):
        return distillation_loss(s, t, targets, weights, temperature=2.0, alpha=0.7)[0]

    g_student, g_teacher = jax.grad(loss, argnums=(0, 1))(jnp.asarray(student), jnp.asarray(teacher))
    assert np.abs(np.asarray(g_student)).max() > 1e-3
    assert not np.asarray(g_teacher).any()
