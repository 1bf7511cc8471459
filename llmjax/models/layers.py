"""Building blocks shared by both model families.

Parameters are stored in ``param_dtype`` (fp32) and cast to the compute
``dtype`` at use; normalization statistics, attention logits and softmax are
computed in fp32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax import axes
from llmjax.models import int8

Dtype = Any
Initializer = Callable[..., jax.Array]

# Large negative logit for masked positions. Finite on purpose: a row whose keys
# are all masked must give a uniform softmax, not NaN.
NEG_INF = -1e10


def normal_init(std: float) -> Initializer:
    return nn.initializers.normal(stddev=std)


class Dense(nn.Module):
    """``x @ kernel`` with a 2-D kernel ``[in, out]`` created with logical axes.

    With ``quantization`` set (``llmjax.models.int8``) the kernel is int8 ``[in, out]`` beside an fp32
    ``kernel_scale [out]`` (logical axis: the kernel's output axis), applied after the matmul.
    """

    features: int
    kernel_axes: tuple[str | None, str | None]
    kernel_init: Initializer = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # Accumulate and return in this dtype (fp32 for LM heads, so bf16 logits are never rounded).
    output_dtype: Dtype | None = None
    quantization: str | None = None  # None or a name in llmjax.model_config.QUANTIZATIONS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.quantization is not None:
            return self._quantized(x)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        # One 2-D matmul over all leading positions: with x kept [b, l, in], the weight gradient
        # contracts two dims of each operand and XLA:CPU lays the activation gradient out with a
        # transposing copy first (T5-small gated FFN, 4 x 512 tokens, fwd+bwd: 140 ms -> 87 ms).
        leading = x.shape[:-1]
        y = jnp.dot(
            x.reshape(-1, x.shape[-1]).astype(self.dtype),
            kernel.astype(self.dtype),
            preferred_element_type=self.output_dtype,
        )
        return y.reshape(*leading, self.features)

    def _quantized(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1], self.features)
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes),
                            shape, jnp.int8)
        scale = self.param("kernel_scale", nn.with_logical_partitioning(nn.initializers.ones, self.kernel_axes[1:]),
                           shape[1:], jnp.float32)
        y = int8.matmul(x.reshape(-1, shape[0]), kernel, scale, contract=0,
                        dynamic=self.quantization == "int8_dynamic", dtype=self.dtype, out_dtype=self.output_dtype)
        return y.reshape(*x.shape[:-1], self.features)


class Embed(nn.Module):
    """Token embedding ``[vocab, embed]``; ``attend`` gives logits against it.

    With ``quantization`` set the embedding is int8 beside an fp32 ``embedding_scale [vocab]``, one per
    row: a looked-up row is rescaled, and ``attend`` rescales each logit (per output channel of the head).
    """

    num_embeddings: int
    features: int
    embedding_init: Initializer = normal_init(1.0)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quantization: str | None = None

    def setup(self):
        shape = (self.num_embeddings, self.features)
        if self.quantization is None:
            self.embedding = self.param(
                "embedding", nn.with_logical_partitioning(self.embedding_init, (axes.VOCAB, axes.EMBED)),
                shape, self.param_dtype,
            )
            return
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.zeros, (axes.VOCAB, axes.EMBED)), shape, jnp.int8
        )
        self.embedding_scale = self.param(
            "embedding_scale", nn.with_logical_partitioning(nn.initializers.ones, (axes.VOCAB,)), shape[:1],
            jnp.float32,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        rows = jnp.take(self.embedding, ids, axis=0)
        if self.quantization is not None:
            rows = rows.astype(jnp.float32) * jnp.take(self.embedding_scale, ids, axis=0)[..., None]
        return rows.astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """``[..., embed] -> [..., vocab]`` logits in fp32."""
        if self.quantization is not None:
            logits = int8.matmul(x.reshape(-1, self.features), self.embedding, self.embedding_scale, contract=1,
                                 dynamic=self.quantization == "int8_dynamic", dtype=self.dtype,
                                 out_dtype=jnp.float32)
            return logits.reshape(*x.shape[:-1], self.num_embeddings)
        return jnp.einsum(
            "...e,ve->...v", x.astype(self.dtype), self.embedding.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )


class RMSNorm(nn.Module):
    """Root-mean-square norm without mean subtraction (T5 "layer norm", LLaMA RMSNorm)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(variance + self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


# ----------------------------------------------------------------------------
# Position information
# ----------------------------------------------------------------------------

def relative_position_bucket(
    relative_position: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucketing of ``key_position - query_position`` (int32 in, int32 out).

    Half the buckets (per direction) hold exact small distances; the rest cover
    distances up to ``max_distance`` logarithmically; farther distances share the
    last bucket.
    """
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # max(distance, 1) keeps log() finite where the small branch is taken anyway.
    scaled = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (scaled * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """Learned per-head scalar bias from bucketed relative positions (T5)."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    embedding_init: Initializer = normal_init(1.0)
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        """``q_positions [b, q]``, ``k_positions [b, k]`` int -> bias ``[b, heads, q, k]`` fp32."""
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(self.embedding_init, (axes.RELPOS, None)),
            (self.num_buckets, self.num_heads),
            self.param_dtype,
        )
        relative = k_positions[:, None, :] - q_positions[:, :, None]
        buckets = relative_position_bucket(
            relative.astype(jnp.int32),
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [b, q, k, h]
        return jnp.transpose(bias, (0, 3, 1, 2))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, "rotate half" convention (as in Hugging Face LLaMA).

    ``x [b, l, heads, head_dim]``, ``positions [b, l]`` int -> same shape and dtype as ``x``.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, l, head_dim/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------

def mask_to_bias(mask: jax.Array) -> jax.Array:
    """Boolean ``[b, 1, q, k]`` (True = may attend) -> additive fp32 bias."""
    return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


def attention_mask(
    query_valid: jax.Array | None,
    key_valid: jax.Array | None,
    *,
    causal: bool = False,
    q_positions: jax.Array | None = None,
    k_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
) -> jax.Array | None:
    """Combine padding, causality and packing into one boolean ``[b, 1, q, k]`` mask.

    ``key_valid [b, k]`` masks padded keys (``query_valid`` is accepted for symmetry
    but padded queries still attend, as in Hugging Face, so their outputs are
    finite). ``causal`` compares ``k_positions <= q_positions`` (cache slots when
    decoding). Segment ids keep packed examples from attending to each other.
    Returns None when nothing is masked.
    """
    del query_valid
    mask = None

    def _and(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if key_valid is not None:
        mask = _and(mask, key_valid[:, None, None, :].astype(bool))
    if causal:
        mask = _and(mask, (k_positions[:, None, None, :] <= q_positions[:, None, :, None]))
    if q_segment_ids is not None and k_segment_ids is not None:
        mask = _and(mask, q_segment_ids[:, None, :, None] == k_segment_ids[:, None, None, :])
    return mask


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads and an optional KV cache.

    Projections are 2-D kernels ``[embed, heads * head_dim]`` (so LoRA and the
    Hugging Face mapping see plain matrices). Query scaling by
    ``head_dim**-0.5`` is optional: T5 folds it into its initialization.

    Caching (``decode=True``):
      * self-attention writes this call's keys/values into ``cache`` at slot
        ``cache_index`` and attends over the whole cache; the caller's ``bias``
        masks slots not yet written.
      * cross-attention (``is_cross=True``) computes keys/values from
        ``inputs_kv`` once and stores them; later calls pass ``inputs_kv=None``.
    The cache is created by ``init`` with ``decode=True`` on inputs whose length
    is the cache length. Cached keys/values are stored heads-major,
    ``[b, kv_heads, len, head_dim]``, so decoding attends over them without a copy.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale_queries: bool = True
    is_cross: bool = False
    rope_theta: float | None = None
    dropout_rate: float = 0.0
    q_init: Initializer = nn.initializers.lecun_normal()
    kv_init: Initializer = nn.initializers.lecun_normal()
    o_init: Initializer = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quantization: str | None = None  # of every projection (Dense.quantization)

    def _dense(self, features, kernel_axes, init, name):
        return Dense(features, kernel_axes, init, self.dtype, self.param_dtype, quantization=self.quantization,
                     name=name)

    def _project_kv(self, inputs_kv, kv_positions):
        kv_width = self.num_kv_heads * self.head_dim
        k = self._dense(kv_width, (axes.EMBED, axes.KV_HEADS), self.kv_init, "k")(inputs_kv)
        v = self._dense(kv_width, (axes.EMBED, axes.KV_HEADS), self.kv_init, "v")(inputs_kv)
        b, l = inputs_kv.shape[:2]
        k = k.reshape(b, l, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, l, self.num_kv_heads, self.head_dim)
        if self.rope_theta is not None:
            k = apply_rope(k, kv_positions, self.rope_theta)
        return k, v

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None,
        *,
        bias: jax.Array | None = None,
        q_positions: jax.Array | None = None,
        kv_positions: jax.Array | None = None,
        decode: bool = False,
        cache_index: jax.Array | int | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """``inputs_q [b, q, embed]`` -> ``[b, q, embed]``.

        ``bias``: additive fp32, broadcastable to ``[b, heads, q, k]`` (masks and
        relative-position bias together). ``q_positions``/``kv_positions``
        ``[b, len]`` are needed only with RoPE.
        """
        b, lq = inputs_q.shape[:2]
        q = self._dense(self.num_heads * self.head_dim, (axes.EMBED, axes.HEADS), self.q_init, "q")(
            inputs_q
        )
        q = q.reshape(b, lq, self.num_heads, self.head_dim)
        if self.rope_theta is not None:
            q = apply_rope(q, q_positions, self.rope_theta)

        if self.is_cross and decode:
            k, v = self._cross_cache(inputs_kv)
        else:
            k, v = self._project_kv(inputs_kv, kv_positions)
            if decode:
                k, v = self._self_cache(k, v, cache_index)

        if self.scale_queries:
            q = q * jnp.asarray(self.head_dim**-0.5, q.dtype)
        groups = self.num_heads // self.num_kv_heads
        qg = q.reshape(b, lq, self.num_kv_heads, groups, self.head_dim)
        if decode:
            # The cache is stored heads-major [b, kv_heads, len, head_dim], so both products are
            # batched over (b, kv_heads) with the cache as is; the [b, len, heads, d] layout
            # made XLA transpose every layer's whole cache on every decoding step.
            lk = k.shape[2]
            qh = jnp.transpose(qg, (0, 2, 3, 1, 4))  # [b, kv_heads, groups, q, d]: small
            qh = qh.reshape(b, self.num_kv_heads, groups * lq, self.head_dim)
            logits = jnp.einsum("bhqd,bhkd->bhqk", qh, k, preferred_element_type=jnp.float32)
        else:
            lk = k.shape[1]
            logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
        logits = logits.reshape(b, self.num_heads, lq, lk)
        if bias is not None:
            logits = logits + bias
        weights = jax.nn.softmax(logits, axis=-1)
        if self.dropout_rate > 0.0 and not deterministic:
            weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
        weights = weights.astype(self.dtype)
        if decode:
            weights = weights.reshape(b, self.num_kv_heads, groups * lq, lk)
            out = jnp.einsum("bhqk,bhkd->bhqd", weights, v.astype(self.dtype))
            out = out.reshape(b, self.num_kv_heads, groups, lq, self.head_dim)
            out = jnp.transpose(out, (0, 3, 1, 2, 4))
        else:
            weights = weights.reshape(b, self.num_kv_heads, groups, lq, lk)
            out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v.astype(self.dtype))
        out = out.reshape(b, lq, self.num_heads * self.head_dim)
        return self._dense(inputs_q.shape[-1], (axes.HEADS, axes.EMBED), self.o_init, "o")(out)

    def _self_cache(self, k, v, cache_index):
        """Write ``k, v [b, len, kv_heads, d]`` from slot ``cache_index`` on.

        Returns the whole cache, ``[b, kv_heads, slots, d]`` each.
        """
        k, v = _heads_major(k), _heads_major(v)
        initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        if not initialized:  # init call: the inputs only size the cache
            return k, v
        index = jnp.asarray(cache_index, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        cached_k.value = jax.lax.dynamic_update_slice(
            cached_k.value, k.astype(cached_k.value.dtype), (zero, zero, index, zero)
        )
        cached_v.value = jax.lax.dynamic_update_slice(
            cached_v.value, v.astype(cached_v.value.dtype), (zero, zero, index, zero)
        )
        return cached_k.value, cached_v.value

    def _cross_cache(self, inputs_kv):
        """Keys/values of the encoder outputs, computed once; -> ``[b, kv_heads, encoder_len, d]``."""
        if inputs_kv is not None:
            k, v = self._project_kv(inputs_kv, None)
            k, v = _heads_major(k), _heads_major(v)
            self.put_variable("cache", "cross_key", k)
            self.put_variable("cache", "cross_value", v)
            return k, v
        if not self.has_variable("cache", "cross_key"):
            raise ValueError(
                "cross-attention cache is empty: run the first decode step with the encoder outputs"
            )
        return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")


def _heads_major(x: jax.Array) -> jax.Array:
    """``[b, len, heads, d]`` -> ``[b, heads, len, d]``, the KV cache layout."""
    return jnp.swapaxes(x, 1, 2)


class FeedForward(nn.Module):
    """Position-wise MLP: plain (``wi``) or gated (``wi_0`` * act(``wi_1``)... see ``gated``).

    Gated form computes ``act(x @ wi_0) * (x @ wi_1) @ wo`` (T5 v1.1 gated-GELU,
    LLaMA SwiGLU with gate=wi_0, up=wi_1).
    """

    hidden: int
    activation: str
    gated: bool
    dropout_rate: float = 0.0
    wi_init: Initializer = nn.initializers.lecun_normal()
    wo_init: Initializer = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quantization: str | None = None  # of every projection (Dense.quantization)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        dense = lambda features, ax, init, name: Dense(  # noqa: E731
            features, ax, init, self.dtype, self.param_dtype, quantization=self.quantization, name=name
        )
        if self.gated:
            h = act(dense(self.hidden, (axes.EMBED, axes.MLP), self.wi_init, "wi_0")(x))
            h = h * dense(self.hidden, (axes.EMBED, axes.MLP), self.wi_init, "wi_1")(x)
        else:
            h = act(dense(self.hidden, (axes.EMBED, axes.MLP), self.wi_init, "wi")(x))
        h = nn.with_logical_constraint(h, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
        if self.dropout_rate > 0.0:
            h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense(x.shape[-1], (axes.MLP, axes.EMBED), self.wo_init, "wo")(h)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


# Names follow Hugging Face's ACT2FN keys so configs round-trip unchanged.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": _gelu_exact,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
