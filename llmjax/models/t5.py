"""T5 encoder-decoder: v1.0 (ReLU, tied embeddings), v1.1 and FLAN-T5 (gated GELU, untied head)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax import axes
from llmjax.model_config import T5Config
from llmjax.models.layers import (
    DTYPES,
    Attention,
    Dense,
    Embed,
    FeedForward,
    RelativePositionBias,
    RMSNorm,
    mask_to_bias,
    normal_init,
)
from llmjax.models.layers import attention_mask as attention_mask_fn
from llmjax.models import soft_prompt as prompts
from llmjax.models.scan import layer_stack


# ----------------------------------------------------------------------------
# Modules
#
# Parameter tree (``model.init(rng, ids, ids)["params"]``) with ``scan_layers=False``; with
# ``scan_layers=True`` (the default) each stack's ``layers_{i}/...`` are one ``layers/...`` whose
# leaves have a leading [num_layers] axis (logical axis ``layers``), see ``llmjax.models.scan``:
#   shared/embedding                                   [vocab, d_model]
#   encoder/relative_position_bias/rel_embedding       [num_buckets, num_heads]
#   encoder/layers_{i}/self_attention_norm/scale       [d_model]
#   encoder/layers_{i}/self_attention/{q,k,v}/kernel   [d_model, num_heads * d_kv]
#   encoder/layers_{i}/self_attention/o/kernel         [num_heads * d_kv, d_model]
#   encoder/layers_{i}/mlp_norm/scale                  [d_model]
#   encoder/layers_{i}/mlp/wi/kernel                   [d_model, d_ff]   (v1.0; gated: wi_0 and wi_1)
#   encoder/layers_{i}/mlp/wo/kernel                   [d_ff, d_model]
#   encoder/final_norm/scale                           [d_model]
#   decoder/...                                        as the encoder, plus in every layer
#   decoder/layers_{i}/cross_attention_norm/scale, decoder/layers_{i}/cross_attention/{q,k,v,o}/kernel
#   lm_head/kernel                                     [d_model, vocab]  (only when not tied)
# Cache tree (``T5.init_cache``): decoder/layers_{i}/self_attention/{cached_key,cached_value}
# [b, heads, cache_len, d_kv] and decoder/layers_{i}/cross_attention/{cross_key,cross_value}
# [b, heads, encoder_len, d_kv] (heads-major, see ``layers.Attention``), in the compute dtype;
# scanned: decoder/layers/... with a leading [decoder_layers] axis (batch on axis 1).
# ----------------------------------------------------------------------------

_ACT = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)


def _arange_positions(batch: int, length: int, start=0) -> jax.Array:
    """``[batch, length]`` int32 positions ``start, start + 1, ...``."""
    row = jnp.asarray(start, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
    return jnp.broadcast_to(row[None, :], (batch, length))


def _with_mask(bias: jax.Array | None, mask: jax.Array | None) -> jax.Array | None:
    """Add the additive form of a boolean ``[b, 1, q, k]`` mask to ``bias``."""
    if mask is None:
        return bias
    return mask_to_bias(mask) if bias is None else bias + mask_to_bias(mask)


class T5Layer(nn.Module):
    """One pre-norm block: self-attention, cross-attention (decoder only), feed-forward.

    Each sub-layer is ``x + dropout(sublayer(norm(x)))``. Arguments are positional, the
    static ones last, so ``scan.layer_stack`` can remat and scan the block.
    """

    config: T5Config
    is_decoder: bool

    @nn.compact
    def __call__(self, x, self_bias, encoder_outputs, cross_bias, cache_index, deterministic, decode):
        """``x [b, t, d_model]``; biases fp32 ``[b|1, heads, t, k]`` (masks + relative positions)."""
        cfg = self.config
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        factor = cfg.initializer_factor
        norm = lambda name: RMSNorm(cfg.layer_norm_epsilon, dtype, param_dtype, name=name)  # noqa: E731
        dropout = nn.Dropout(cfg.dropout_rate)

        def attention(is_cross, name):
            # HF T5's initialization: the query scale d_kv**-0.5 is folded into q's init.
            return Attention(
                num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.d_kv,
                scale_queries=False, is_cross=is_cross, dropout_rate=cfg.dropout_rate,
                q_init=normal_init(factor * (cfg.d_model * cfg.d_kv) ** -0.5),
                kv_init=normal_init(factor * cfg.d_model**-0.5),
                o_init=normal_init(factor * (cfg.num_heads * cfg.d_kv) ** -0.5),
                dtype=dtype, param_dtype=param_dtype, quantization=cfg.quantization, name=name,
            )

        h = norm("self_attention_norm")(x)
        h = attention(False, "self_attention")(
            h, h, bias=self_bias, decode=decode, cache_index=cache_index, deterministic=deterministic
        )
        x = x + dropout(h, deterministic=deterministic)

        if self.is_decoder:
            h = norm("cross_attention_norm")(x)
            h = attention(True, "cross_attention")(
                h, encoder_outputs, bias=cross_bias, decode=decode, deterministic=deterministic
            )
            x = x + dropout(h, deterministic=deterministic)

        h = norm("mlp_norm")(x)
        h = FeedForward(
            hidden=cfg.d_ff, activation=cfg.activation, gated=cfg.gated, dropout_rate=cfg.dropout_rate,
            wi_init=normal_init(factor * cfg.d_model**-0.5), wo_init=normal_init(factor * cfg.d_ff**-0.5),
            dtype=dtype, param_dtype=param_dtype, quantization=cfg.quantization, name="mlp",
        )(h, deterministic)
        x = x + dropout(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, _ACT)


class T5Stack(nn.Module):
    """Encoder or decoder stack over already-embedded inputs; ends with the final RMSNorm.

    The relative position bias is computed once per stack (HF: in the first layer)
    and shared by every layer: bidirectional in the encoder, causal buckets in the decoder.
    """

    config: T5Config
    is_decoder: bool

    @nn.compact
    def __call__(self, x, q_positions, k_positions, mask, encoder_outputs, cross_mask, *,
                 deterministic, decode=False, cache_index=None):
        """``x [b, t, d_model]`` -> ``[b, t, d_model]`` (compute dtype).

        ``q_positions [b, t]``/``k_positions [b, k]`` feed the relative position bias;
        ``mask``/``cross_mask`` are boolean ``[b, 1, t, k]`` or None.
        """
        cfg = self.config
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        position_bias = RelativePositionBias(
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance,
            num_heads=cfg.num_heads,
            bidirectional=not self.is_decoder,
            embedding_init=normal_init(cfg.initializer_factor * cfg.d_model**-0.5),
            param_dtype=param_dtype,
            name="relative_position_bias",
        )(q_positions, k_positions)
        self_bias = _with_mask(position_bias, mask)
        cross_bias = _with_mask(None, cross_mask)

        dropout = nn.Dropout(cfg.dropout_rate)
        x = dropout(x, deterministic=deterministic)
        num_layers = cfg.decoder_layers if self.is_decoder else cfg.num_layers
        # The position bias is computed once above and broadcast to every layer, not carried.
        x = layer_stack(T5Layer, (cfg, self.is_decoder), cfg, num_layers, x,
                        broadcast=(self_bias, encoder_outputs, cross_bias, cache_index),
                        static=(deterministic, decode), rematerialize=not decode)
        x = RMSNorm(cfg.layer_norm_epsilon, dtype, param_dtype, name="final_norm")(x)
        x = dropout(x, deterministic=deterministic)
        return nn.with_logical_constraint(x, _ACT)


class T5(nn.Module):
    """T5 encoder-decoder. See the parameter tree above; logits are fp32.

    Tied embeddings (v1.0) scale the decoder output by ``d_model**-0.5`` before the
    shared-embedding LM head; untied models (v1.1, FLAN-T5) use ``lm_head`` unscaled.
    """

    config: T5Config

    def setup(self):
        cfg = self.config
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        self.shared = Embed(
            cfg.vocab_size, cfg.d_model, normal_init(cfg.initializer_factor * 1.0), dtype, param_dtype,
            quantization=cfg.quantization,
        )
        self.encoder = T5Stack(cfg, is_decoder=False)
        self.decoder = T5Stack(cfg, is_decoder=True)
        if not cfg.tie_word_embeddings:
            # fan-in init (t5x) rather than HF's std 1.0, so a fresh model starts with unit-scale logits.
            self.lm_head = Dense(
                cfg.vocab_size, (axes.EMBED, axes.VOCAB),
                normal_init(cfg.initializer_factor * cfg.d_model**-0.5), dtype, param_dtype,
                output_dtype=jnp.float32, quantization=cfg.quantization,
            )

    def __call__(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None, *,
                 encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
                 decoder_positions=None, deterministic=True, return_hidden=False, soft_prompt=None):
        """``input_ids [b, s]``, ``decoder_input_ids [b, t]`` int -> logits ``[b, t, vocab]`` fp32.

        Masks are ``[b, len]`` (1 = real token). For packed batches, segment ids
        ``[b, len]`` keep examples apart and positions ``[b, len]`` restart at 0 per
        example. ``return_hidden=True`` also returns the final decoder hidden state
        ``[b, t, d_model]`` (after the final norm, before the LM head scaling).
        ``soft_prompt`` ``[n, d_model]`` or ``[b, n, d_model]``: prompt tuning, see :meth:`encode`;
        the decoder attends to all ``n + s`` encoder outputs.
        """
        encoded = self.encode(
            input_ids, attention_mask, segment_ids=encoder_segment_ids, positions=encoder_positions,
            deterministic=deterministic, soft_prompt=soft_prompt,
        )
        if soft_prompt is not None:
            attention_mask = prompts.extend_mask(attention_mask, prompts.prompt_length(soft_prompt))
        return self.decode(
            decoder_input_ids, encoded, attention_mask, decoder_attention_mask,
            segment_ids=decoder_segment_ids, positions=decoder_positions,
            encoder_segment_ids=encoder_segment_ids, deterministic=deterministic,
            return_hidden=return_hidden,
        )

    def encode(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None, deterministic=True,
               soft_prompt=None):
        """``input_ids [b, s]`` -> encoder outputs ``[b, s, d_model]`` (compute dtype).

        ``soft_prompt`` ``[n, d_model]`` or ``[b, n, d_model]`` (fp32 is cast to the compute dtype) is put
        before the token embeddings, as PEFT's prompt tuning does with ``inputs_embeds``: the outputs are
        ``[b, n + s, d_model]``, the virtual tokens take relative positions ``0 .. n-1`` and the tokens
        ``n .. n+s-1``, and ``attention_mask`` grows by ``n`` ones (pass
        ``llmjax.models.soft_prompt.extend_mask(attention_mask, n)`` to :meth:`decode`). Not with packing.
        """
        if soft_prompt is not None:
            if segment_ids is not None or positions is not None:
                raise ValueError("T5.encode: soft_prompt cannot be combined with packing (segment_ids/positions); "
                                 "prompt tuning needs one example per row")
            prompts.check_soft_prompt(soft_prompt, input_ids.shape[0], self.config.d_model)
            attention_mask = prompts.extend_mask(attention_mask, prompts.prompt_length(soft_prompt))
        s = input_ids.shape[1] + prompts.prompt_length(soft_prompt)
        if positions is None:
            # One row, broadcast over the batch: the relative bias is then gathered (and its gradient
            # scattered) once instead of once per example.
            positions = _arange_positions(1, s)
        mask = attention_mask_fn(
            None, attention_mask, q_segment_ids=segment_ids, k_segment_ids=segment_ids
        )
        x = self.shared(input_ids)
        if soft_prompt is not None:
            x = prompts.prepend(soft_prompt, x)
        x = nn.with_logical_constraint(x, _ACT)
        return self.encoder(x, positions, positions, mask, None, None, deterministic=deterministic)

    def decode(self, decoder_input_ids, encoder_outputs, encoder_mask=None, decoder_attention_mask=None, *,
               segment_ids=None, positions=None, encoder_segment_ids=None, decode=False, cache_index=None,
               deterministic=True, return_hidden=False):
        """Decoder + LM head: ``decoder_input_ids [b, t]`` -> logits ``[b, t, vocab]`` fp32.

        ``encoder_outputs [b, s, d_model]``, ``encoder_mask [b, s]``. Training/scoring
        (``decode=False``): causal over the ``t`` tokens, ``decoder_attention_mask [b, t]``
        masks padded keys, ``segment_ids``/``positions`` as in ``__call__``.

        Cached decoding (``decode=True``, with ``mutable=["cache"]`` and a cache from
        ``init_cache``): the ``t`` tokens are written to cache slots
        ``cache_index .. cache_index + t - 1``; a query attends to key slots ``<=`` its
        own slot, and the slot index is the position for the relative bias.
        ``decoder_attention_mask`` is then ``[b, cache_len]`` key validity. Pass
        ``encoder_outputs`` on the first call (cross keys/values are computed and
        cached) and None afterwards; pass ``encoder_mask`` on every call.
        """
        b, t = decoder_input_ids.shape
        if decode:
            if segment_ids is not None or positions is not None:
                raise ValueError(
                    "T5.decode(decode=True) uses cache slots as positions and does not support packing; "
                    "drop segment_ids/positions when decoding with the cache"
                )
            cache_index = 0 if cache_index is None else cache_index
            q_positions = _arange_positions(b, t, cache_index)
            k_positions = _arange_positions(b, self._cache_length(t))
            mask = attention_mask_fn(
                None, decoder_attention_mask, causal=True, q_positions=q_positions, k_positions=k_positions
            )
        else:
            # Causality by index in the (possibly packed) sequence; the relative bias by example position.
            # One row broadcast over the batch, as in `encode`.
            index = _arange_positions(1, t)
            q_positions = k_positions = index if positions is None else positions
            mask = attention_mask_fn(
                None, decoder_attention_mask, causal=True, q_positions=index, k_positions=index,
                q_segment_ids=segment_ids, k_segment_ids=segment_ids,
            )
        cross_mask = attention_mask_fn(
            None, encoder_mask, q_segment_ids=segment_ids, k_segment_ids=encoder_segment_ids
        )
        x = nn.with_logical_constraint(self.shared(decoder_input_ids), _ACT)
        hidden = self.decoder(
            x, q_positions, k_positions, mask, encoder_outputs, cross_mask,
            deterministic=deterministic, decode=decode, cache_index=cache_index,
        )
        logits = self._logits(hidden)
        return (logits, hidden) if return_hidden else logits

    def _logits(self, hidden):
        cfg = self.config
        if cfg.tie_word_embeddings:
            scaled = hidden * jnp.asarray(cfg.d_model**-0.5, hidden.dtype)
            logits = self.shared.attend(scaled)
        else:
            logits = self.lm_head(hidden)
        return nn.with_logical_constraint(logits, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))

    def _cache_length(self, length: int) -> int:
        cache = self.variables.get("cache")
        if cache is None:  # the init call: these inputs size the cache
            return length
        if self.config.scan_layers:  # [layers, b, heads, cache_len, d_kv]
            return cache["decoder"]["layers"]["self_attention"]["cached_key"].shape[3]
        return cache["decoder"]["layers_0"]["self_attention"]["cached_key"].shape[2]

    def init_cache(self, batch_size: int, cache_len: int, encoder_len: int) -> dict:
        """A zero ``"cache"`` collection for ``decode(..., decode=True)``; no parameters are computed.

        Call on the unbound module: ``cache = model.init_cache(b, max_decoder_len, encoder_len)``,
        then ``model.apply({"params": p, "cache": cache}, ids, enc, enc_mask, decode=True,
        cache_index=i, method=T5.decode, mutable=["cache"])`` -> ``(logits, {"cache": new_cache})``.
        """
        dtype = DTYPES[self.config.dtype]
        ids = jnp.zeros((batch_size, cache_len), jnp.int32)
        encoded = jnp.zeros((batch_size, encoder_len, self.config.d_model), dtype)
        shapes = jax.eval_shape(
            lambda: self.init(jax.random.key(0), ids, encoded, decode=True, method=T5.decode)
        )
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
