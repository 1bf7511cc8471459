"""int8 weights inside the model: symmetric per-output-channel quantization and the matmuls that read it.

A quantized kernel ``[..., in, out]`` is stored as int8 ``q`` with an fp32 ``scale [..., out]``, one per
output channel: ``w ~= q * scale`` with ``scale = max|w[:, j]| / 127`` and ``q = round(w / scale)``, so
``|w - q * scale| <= scale / 2`` everywhere. An embedding ``[vocab, embed]`` is quantized per row (per
token), which is per output channel of the tied LM head (``x @ embedding.T``) as well.

Two ways to multiply (the model config's ``quantization``):

* ``"int8"`` (weight-only): ``(x @ q.astype(dtype)) * scale``, activations in the compute dtype
  (bf16/fp32). Exact up to the weight rounding. XLA:CPU does not fuse the int8->float convert into
  its dot: it writes the dequantized kernel to memory first (a lone LM-head matmul 13x slower than
  fp32), and in the decoding loop it hoists the LM head's copy out of the token loop, which then holds
  an fp32 head for the whole ``generate`` call (``benchmarks/quantize.py``). It is the form training
  (QLoRA) differentiates through.
* ``"int8_dynamic"`` (W8A8, "dynamic quantization"): each row of ``x`` is quantized on the fly
  (symmetric, per token), then an int8 x int8 -> int32 ``dot_general``, rescaled by both scales after
  the matmul. XLA:CPU hands such dots to YNNPACK, which reads the int8 kernel as is: the fast form for
  inference on CPU. Not differentiable in ``x`` (rounding), so inference only.

The scale is applied after the matmul (it is per output column), never to the kernel.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from llmjax.model_config import QUANTIZATIONS  # noqa: F401 (re-exported: the names the model config takes)

INT8_MAX = 127  # symmetric: -127..127 (-128 unused, so negation is exact)


def quantize_channels(w: jax.Array, reduce_axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 quantization of ``w`` with one scale per slice along ``reduce_axis``.

    ``w`` float ``[..., in, out]`` with ``reduce_axis=-2`` (a Dense kernel: a scale per output channel) or
    ``[vocab, embed]`` with ``reduce_axis=-1`` (an embedding: a scale per token). Returns ``(q int8 same
    shape, scale fp32 with reduce_axis removed)``; an all-zero channel gets scale 1 (and q 0).
    """
    w32 = jnp.asarray(w, jnp.float32)
    absmax = jnp.max(jnp.abs(w32), axis=reduce_axis)
    scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w32 / jnp.expand_dims(scale, reduce_axis)), -INT8_MAX, INT8_MAX)
    return q.astype(jnp.int8), scale


def dequantize_channels(q: jax.Array, scale: jax.Array, reduce_axis: int, dtype=jnp.float32) -> jax.Array:
    """The inverse of :func:`quantize_channels`: ``q * scale`` in ``dtype``."""
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, reduce_axis)).astype(dtype)


def _quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row dynamic quantization of ``x [rows, k]`` float -> ``(int8 [rows, k], fp32 scale [rows, 1])``."""
    x32 = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)
    return jnp.clip(jnp.round(x32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def matmul(x: jax.Array, q: jax.Array, scale: jax.Array, *, contract: int, dynamic: bool, dtype,
           out_dtype=None) -> jax.Array:
    """``x [rows, k]`` times an int8 matrix ``q`` with per-output scales ``scale [n]`` -> ``[rows, n]``.

    ``contract``: the axis of ``q`` that ``x`` contracts with (0 for a kernel ``[k, n]``, 1 for an
    embedding ``[n, k]`` used as the LM head). ``dynamic``: W8A8 (see the module docstring), else
    weight-only in ``dtype``. The result is in ``out_dtype`` (default ``dtype``); accumulation is fp32
    (int32 for W8A8).
    """
    out_dtype = out_dtype or dtype
    dims = (((1,), (contract,)), ((), ()))
    if not dynamic:
        return _weight_only(x, q, scale, contract, jnp.dtype(dtype)).astype(out_dtype)
    xq, x_scale = _quantize_rows(x)
    if x.shape[0] == 1:
        # XLA:CPU rewrites a one-row dot as multiply + reduce, which YNNPACK does not take: the int8 kernel
        # is then widened to int32 in memory first (an LM head 512x32128 became 12-20x slower than fp32,
        # benchmarks/results/quantize_cpu.txt). The row sent twice keeps batch-1 decoding on YNNPACK.
        acc = lax.dot_general(jnp.concatenate([xq, xq]), q, dims, preferred_element_type=jnp.int32)[:1]
    else:
        acc = lax.dot_general(xq, q, dims, preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * x_scale * scale).astype(out_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _weight_only(x, q, scale, contract: int, dtype):
    """``(x @ q.astype(dtype)) * scale`` fp32. Its gradient re-widens ``q`` in the backward pass instead of
    keeping the widened kernel from the forward pass (what autodiff would save), so training through an int8
    base (QLoRA) holds no float copy of the frozen weights between the two passes."""
    dims = (((1,), (contract,)), ((), ()))
    return lax.dot_general(x.astype(dtype), q.astype(dtype), dims, preferred_element_type=jnp.float32) * scale


def _weight_only_fwd(x, q, scale, contract, dtype):
    return _weight_only(x, q, scale, contract, dtype), (x, q, scale)


def _weight_only_bwd(contract, dtype, residuals, g):
    x, q, scale = residuals
    w = q.astype(dtype)
    # dx = (g * scale) @ w^T: contract g's output axis with w's output axis (the one x does not contract)
    dx = lax.dot_general((g * scale).astype(dtype), w, (((1,), (1 - contract,)), ((), ())),
                         preferred_element_type=jnp.float32).astype(x.dtype)
    # d scale: unused for a frozen base, and then removed by XLA with x's residual
    unscaled = lax.dot_general(x.astype(dtype), w, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32)
    return dx, np.zeros(q.shape, jax.dtypes.float0), jnp.sum(g * unscaled, axis=0).astype(scale.dtype)


_weight_only.defvjp(_weight_only_fwd, _weight_only_bwd)
