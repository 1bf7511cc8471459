"""LLaMA-style decoder-only model: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Parameter tree (``H`` = hidden_size, ``V`` = vocab_size, ``Q`` = num_attention_heads * head_dim,
``K`` = num_key_value_heads * head_dim, ``F`` = intermediate_size; logical axes in brackets;
kernels are ``[in, out]``, the transpose of a torch ``Linear.weight``)::

    embed/embedding                         [V, H]  (vocab, embed)
    layers_{i}/pre_attention_norm/scale     [H]     (norm,)           HF input_layernorm
    layers_{i}/self_attention/q/kernel      [H, Q]  (embed, heads)
    layers_{i}/self_attention/k/kernel      [H, K]  (embed, kv_heads)
    layers_{i}/self_attention/v/kernel      [H, K]  (embed, kv_heads)
    layers_{i}/self_attention/o/kernel      [Q, H]  (heads, embed)
    layers_{i}/pre_mlp_norm/scale           [H]     (norm,)           HF post_attention_layernorm
    layers_{i}/mlp/wi_0/kernel              [H, F]  (embed, mlp)      gate_proj
    layers_{i}/mlp/wi_1/kernel              [H, F]  (embed, mlp)      up_proj
    layers_{i}/mlp/wo/kernel                [F, H]  (mlp, embed)      down_proj
    final_norm/scale                        [H]     (norm,)
    lm_head/kernel                          [H, V]  (embed, vocab)    only if not tie_word_embeddings

That is the tree with ``scan_layers=False``. With ``scan_layers=True`` (the default) the layers are one
``nn.scan``: ``layers/...`` replaces ``layers_{i}/...`` and every leaf there has a leading ``[L]`` axis
(logical axis ``layers``), e.g. ``layers/self_attention/q/kernel [L, H, Q]``; see ``llmjax.models.scan``.

KV cache (``decode=True``), per layer ``layers_{i}/self_attention/cached_key`` and
``cached_value`` ``[b, num_key_value_heads, cache_len, head_dim]`` (heads-major) in the compute dtype
(scanned: ``layers/self_attention/...`` ``[L, b, ...]``, batch on axis 1).
Create it with :meth:`Decoder.init_cache` (or ``model.init(rng, ids_of_cache_len, decode=True)["cache"]``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax import axes
from llmjax.models import layers
from llmjax.model_config import DecoderConfig
from llmjax.models.layers import (
    DTYPES, Attention, Dense, Embed, FeedForward, RMSNorm, mask_to_bias, normal_init,
)
from llmjax.models import soft_prompt as prompts
from llmjax.models.scan import layer_stack


_HIDDEN_AXES = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)


def default_positions(
    length: int,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """RoPE positions ``[b, length]`` int32 (``[1, length]`` with no mask) when the caller gives none.

    * ``segment_ids`` (packing): positions restart at 0 where the segment id changes.
    * ``attention_mask`` (left padding): ``cumsum(mask) - 1`` clipped at 0, Hugging Face's
      convention, so the first real token of every row is position 0.
    * neither: ``arange(length)``.
    """
    slots = jnp.arange(length, dtype=jnp.int32)[None, :]
    if segment_ids is not None:
        new_segment = segment_ids[:, 1:] != segment_ids[:, :-1]
        starts = jnp.concatenate([jnp.ones_like(new_segment[:, :1]), new_segment], axis=1)
        segment_start = jax.lax.cummax(jnp.where(starts, slots, 0), axis=1)
        return slots - segment_start
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return slots


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, bias, positions, cache_index, deterministic, decode):
        """``x [b, t, hidden]``; ``bias`` fp32 ``[b|1, 1, t, k]``; ``positions [b, t]`` RoPE positions.

        Arguments are positional, the static ones last, so ``scan.layer_stack`` can remat and scan the block.
        """
        cfg = self.config
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        init = normal_init(cfg.initializer_range)

        normed = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="pre_attention_norm")(x)
        attended = Attention(
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.kv_heads,
            head_dim=cfg.dim_per_head,
            scale_queries=True,
            rope_theta=cfg.rope_theta,
            dropout_rate=cfg.attention_dropout,
            q_init=init, kv_init=init, o_init=init,
            dtype=dtype, param_dtype=param_dtype, quantization=cfg.quantization,
            name="self_attention",
        )(
            normed, normed, bias=bias, q_positions=positions, kv_positions=positions,
            decode=decode, cache_index=cache_index, deterministic=deterministic,
        )
        x = nn.with_logical_constraint(x + attended, _HIDDEN_AXES)

        normed = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="pre_mlp_norm")(x)
        mlp_out = FeedForward(
            hidden=cfg.intermediate_size, activation=cfg.hidden_act, gated=True,
            wi_init=init, wo_init=init, dtype=dtype, param_dtype=param_dtype, quantization=cfg.quantization,
            name="mlp",
        )(normed, deterministic=deterministic)
        return nn.with_logical_constraint(x + mlp_out, _HIDDEN_AXES)


class Decoder(nn.Module):
    """LLaMA-style causal language model (Hugging Face ``LlamaForCausalLM`` numerics).

    Full forward::

        logits = model.apply({"params": p}, input_ids, attention_mask)        # [b, t, vocab] fp32

    Cached decoding: make a zero cache for ``cache_len`` slots, prefill a chunk, then step::

        cache = model.init_cache(batch, cache_len)
        logits, vars = model.apply({"params": p, "cache": cache}, prompt, key_mask, decode=True,
                                   cache_index=0, positions=prompt_positions, mutable=["cache"])
        logits, vars = model.apply({"params": p, "cache": vars["cache"]}, next_ids, key_mask,
                                   decode=True, cache_index=prompt_len, positions=..., mutable=["cache"])

    In decode mode ``attention_mask`` is ``[b, cache_len]`` key validity over cache slots (0 on
    left padding; slots not yet written are masked by causality whatever they hold).
    """

    config: DecoderConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        decode: bool = False,
        cache_index: jax.Array | int | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
        soft_prompt: jax.Array | None = None,
        logits_to_keep: int = 0,
    ):
        """Logits for every position.

        Args:
          input_ids: ``[b, t]`` int. With ``decode=True``, a chunk of ``L = t`` tokens written
            to cache slots ``cache_index .. cache_index + L - 1``.
          attention_mask: ``[b, t]`` (``[b, cache_len]`` when decoding) 1 = real token, 0 = pad.
          positions: ``[b, t]`` int RoPE positions. Default: :func:`default_positions` (for a
            decode chunk, the same rule read off the cache mask at the chunk's slots).
          segment_ids: ``[b, t]`` int, packed examples; tokens attend only within their segment
            (not available when decoding).
          decode: use and update the ``cache`` collection (apply with ``mutable=["cache"]``).
          cache_index: int or scalar int array, the first cache slot of this chunk (default 0).
          deterministic: False enables attention dropout (needs a ``dropout`` rng).
          return_hidden: also return the final-norm hidden states.
          soft_prompt: ``[n, hidden]`` or ``[b, n, hidden]`` virtual token embeddings (prompt tuning) put
            before the token embeddings as PEFT does with ``inputs_embeds``: the model runs on ``n + t``
            slots, ``attention_mask`` grows by ``n`` ones and the default positions are computed over that
            extended mask (virtual tokens ``0 .. n-1``, tokens shifted by ``n``); given ``positions``
            are the tokens' own (already shifted) positions, the virtual tokens get ``0 .. n-1``. When
            decoding, the chunk fills slots ``cache_index .. cache_index + n + t - 1`` and
            ``attention_mask`` covers the cache slots, the virtual ones included. Not with packing.
          logits_to_keep: as in Hugging Face: 0 = logits (and hidden states) for every token; ``n > 0`` =
            for the last ``n`` only (prefill before decoding needs the last one: the LM head, a
            ``[hidden, vocab]`` product per token, is then run once per row instead of ``t`` times).

        Returns:
          logits ``[b, t, vocab]`` fp32 (the real tokens only; ``[b, n, vocab]`` with ``logits_to_keep=n``),
          or ``(logits, hidden [b, t | n, hidden] compute dtype)``.
        """
        cfg = self.config
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 = every position), got {logits_to_keep}")
        virtual = prompts.prompt_length(soft_prompt)
        if soft_prompt is not None:
            if segment_ids is not None:
                raise ValueError("soft_prompt cannot be combined with segment_ids (packing); prompt tuning needs "
                                 "one example per row")
            prompts.check_soft_prompt(soft_prompt, input_ids.shape[0], cfg.hidden_size)
            if not decode:
                attention_mask = prompts.extend_mask(attention_mask, virtual)
            if positions is not None:
                positions = prompts.extend_positions(jnp.asarray(positions), virtual)
        length = input_ids.shape[1] + virtual
        slots_shape = (input_ids.shape[0], length)

        if decode:
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) cannot be combined with decode=True")
            cache_index = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
            q_slots = (cache_index + jnp.arange(length, dtype=jnp.int32))[None, :]
            cache_len = self._cache_len(length)
            k_slots = jnp.arange(cache_len, dtype=jnp.int32)[None, :]
            if positions is None:
                mask_positions = default_positions(cache_len, attention_mask)
                positions = jnp.take_along_axis(
                    jnp.broadcast_to(mask_positions, (input_ids.shape[0], cache_len)),
                    jnp.broadcast_to(q_slots, slots_shape), axis=1,
                )
            mask = layers.attention_mask(
                None, attention_mask, causal=True, q_positions=q_slots, k_positions=k_slots
            )
        else:
            if positions is None:
                positions = default_positions(length, attention_mask, segment_ids)
            slots = jnp.arange(length, dtype=jnp.int32)[None, :]
            mask = layers.attention_mask(
                None, attention_mask, causal=True, q_positions=slots, k_positions=slots,
                q_segment_ids=segment_ids, k_segment_ids=segment_ids,
            )
        bias = mask_to_bias(mask)
        positions = jnp.broadcast_to(positions, slots_shape)

        embed = Embed(
            cfg.vocab_size, cfg.hidden_size, normal_init(cfg.initializer_range), dtype, param_dtype,
            quantization=cfg.quantization, name="embed",
        )
        x = embed(input_ids)
        if soft_prompt is not None:
            x = prompts.prepend(soft_prompt, x)
        x = nn.with_logical_constraint(x, _HIDDEN_AXES)
        x = layer_stack(DecoderLayer, (cfg,), cfg, cfg.num_hidden_layers, x,
                        broadcast=(bias, positions, cache_index), static=(deterministic, decode),
                        rematerialize=not decode)
        hidden = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="final_norm")(x)
        if virtual:  # the virtual tokens predict nothing: no LM head for them
            hidden = hidden[:, virtual:]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        hidden = nn.with_logical_constraint(hidden, _HIDDEN_AXES)

        if cfg.tie_word_embeddings:
            logits = embed.attend(hidden)
        else:
            logits = Dense(
                cfg.vocab_size, (axes.EMBED, axes.VOCAB), normal_init(cfg.initializer_range),
                dtype, param_dtype, output_dtype=jnp.float32, quantization=cfg.quantization, name="lm_head",
            )(hidden)
        logits = nn.with_logical_constraint(
            logits.astype(jnp.float32), (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB)
        )
        return (logits, hidden) if return_hidden else logits

    def init_cache(self, batch_size: int, cache_len: int) -> dict:
        """A zero ``"cache"`` collection with ``cache_len`` slots; no parameters are computed.

        Call on the unbound module: ``cache = model.init_cache(b, cache_len)``. Equal to
        ``model.init(rng, jnp.zeros((b, cache_len), jnp.int32), decode=True)["cache"]``.
        """
        ids = jnp.zeros((batch_size, cache_len), jnp.int32)
        shapes = jax.eval_shape(lambda: self.init(jax.random.key(0), ids, decode=True))
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

    def _cache_len(self, chunk_len: int) -> int:
        cache = self.variables.get("cache")
        if not cache:  # init call: the input only sizes the cache
            return chunk_len
        if self.config.scan_layers:  # [layers, b, kv_heads, cache_len, head_dim]
            return cache["layers"]["self_attention"]["cached_key"].shape[3]
        return cache["layers_0"]["self_attention"]["cached_key"].shape[2]
