"""How each kind of model runs under the decoding loop: prefill once, then one token per step.

One adapter per kind (``Family.seq2seq`` of ``llmjax.models.family``): encoder-decoder models
offer ``encode``/``decode`` methods like ``T5``; decoder-only models take ``positions`` and a
key mask like ``Decoder``. An adapter offers three pure functions, all traced inside the one jitted loop:

* ``prefill(model, params, input_ids, attention_mask, copies, max_new_tokens,
  decoder_start_token_id, soft_prompt)`` -> ``(logits [B * copies, V] fp32, cache, context)``: runs the prompt
  once (T5: the encoder once and the decoder start token, which also fills the cross-attention keys and
  values; decoder: the whole left-padded prompt), after the ``soft_prompt`` (``[n, d]``/``[B, n, d]``, prompt
  tuning; None: none) when there is one, then repeats the result ``copies``
  times (beams or samples per prompt) row by row, so copies of one prompt are adjacent.
  ``context`` is loop-invariant (masks, positions) and is closed over, not carried.
* ``step(model, params, cache, context, tokens [N], step)`` -> ``(logits [N, V], cache)``:
  feeds new token number ``step`` (0-based) into its cache slot.
* ``prefix(input_ids, decoder_start_token_id)`` -> the tokens the output starts with
  (T5: the start token; decoder: the prompt), as Hugging Face returns them.
* ``prefix_first(attention_mask)`` -> ``[B]`` int32, the first column of the prefix that is not
  padding (decoder: left padding skipped; T5: 0), where ``repetition_penalty`` starts counting.

The loop runs every model with its layers unrolled (:func:`unrolled_layers`), so its cache has one
entry per layer with the batch on axis 0; :func:`take_cache_rows` also handles a stacked cache
(leaves ``[layers, batch, ...]``, batch on axis 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.models import cache_batch_axis, model_family, replace_config, unstack_layers
from llmjax.models.decoder import default_positions
from llmjax.models.soft_prompt import extend_mask, prompt_length


def _repeat_rows(tree, copies: int, axis: int = 0):
    if copies == 1:
        return tree
    return jax.tree_util.tree_map(lambda x: jnp.repeat(x, copies, axis=axis), tree)


def unrolled_layers(model, params):
    """``(model, params)`` with the layers unrolled (``scan_layers=False``): the layout decoding runs in.

    A scanned stack reads each layer's weights and KV cache as a dynamic slice of the stacked
    ``[layers, ...]`` arrays, and XLA:CPU copies every such slice on every decoding step (and the
    whole stacked cache once more per step); in the decoder benchmark at batch 8 those copies took
    about as long as all the layers' matmuls. Unstacking here, inside the jitted loop, copies the
    layer weights once per call instead; the copy is held while decoding. Unchanged when unscanned.
    """
    if not model.config.scan_layers:
        return model, params
    return replace_config(model, scan_layers=False), unstack_layers(params, model.config)


def take_cache_rows(model, cache, rows: jax.Array):
    """The cache with its batch rows reordered: new row ``i`` is old row ``rows[i]`` (``rows [N]`` int)."""
    axis = cache_batch_axis(model.config)
    return jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=axis), cache)


class EncoderDecoderFamily:
    """Encoder-decoder (T5): the decoder starts from ``decoder_start_token_id`` at cache slot 0."""

    @staticmethod
    def prefix(input_ids: jax.Array, decoder_start_token_id: int) -> jax.Array:
        return jnp.full((input_ids.shape[0], 1), decoder_start_token_id, jnp.int32)

    @staticmethod
    def prefix_first(attention_mask: jax.Array) -> jax.Array:
        return jnp.zeros((attention_mask.shape[0],), jnp.int32)

    @staticmethod
    def prefill(model, params, input_ids, attention_mask, copies, max_new_tokens, decoder_start_token_id,
                soft_prompt=None):
        if soft_prompt is None:
            encoded = model.apply({"params": params}, input_ids, attention_mask, method="encode")
        else:  # the encoder outputs and the cross-attention mask cover the virtual tokens too
            encoded = model.apply({"params": params}, input_ids, attention_mask, soft_prompt=soft_prompt,
                                  method="encode")
            attention_mask = extend_mask(attention_mask, prompt_length(soft_prompt))
        encoded, encoder_mask = _repeat_rows((encoded, attention_mask), copies)
        rows = encoded.shape[0]
        # Slot 0 holds the start token; new token i (0-based) is fed at slot i + 1.
        cache = model.init_cache(rows, 1 + max_new_tokens, encoded.shape[1])
        start = jnp.full((rows, 1), decoder_start_token_id, jnp.int32)
        logits, variables = model.apply(
            {"params": params, "cache": cache}, start, encoded, encoder_mask, None,
            decode=True, cache_index=0, method="decode", mutable=["cache"],
        )
        return logits[:, -1], variables["cache"], {"encoder_mask": encoder_mask}

    @staticmethod
    def step(model, params, cache, context, tokens, step):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tokens[:, None], None, context["encoder_mask"], None,
            decode=True, cache_index=step + 1, method="decode", mutable=["cache"],
        )
        return logits[:, -1], variables["cache"]


class DecoderOnlyFamily:
    """LLaMA-style decoder: left-padded prompt in slots ``0..P-1``, new token i at slot ``P + i``.

    RoPE positions follow Hugging Face: ``cumsum(mask) - 1`` over the prompt, so every
    row's first real token is position 0 and new token i sits at ``real_tokens + i``.
    A soft prompt of ``n`` virtual tokens takes slots and positions ``0..n-1`` before the prompt
    (PEFT's order), which then starts at slot and position ``n``.
    """

    @staticmethod
    def prefix(input_ids: jax.Array, decoder_start_token_id: int) -> jax.Array:
        return input_ids

    @staticmethod
    def prefix_first(attention_mask: jax.Array) -> jax.Array:
        return jnp.argmax(attention_mask != 0, axis=1).astype(jnp.int32)

    @staticmethod
    def prefill(model, params, input_ids, attention_mask, copies, max_new_tokens, decoder_start_token_id,
                soft_prompt=None):
        batch = input_ids.shape[0]
        virtual = prompt_length(soft_prompt)
        prompt_len = virtual + input_ids.shape[1]  # cache slots the prompt fills (virtual tokens first)
        attention_mask = extend_mask(attention_mask, virtual)
        cache_len = prompt_len + max_new_tokens
        key_mask = jnp.concatenate(
            [attention_mask.astype(jnp.int32), jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1
        )
        cache = model.init_cache(batch, cache_len)
        positions = default_positions(prompt_len, attention_mask)
        extra = {}
        if soft_prompt is not None:  # the model puts the virtual tokens' positions 0..n-1 first itself
            positions, extra = positions[:, virtual:], {"soft_prompt": soft_prompt}
        logits, variables = model.apply(
            {"params": params, "cache": cache}, input_ids, key_mask,
            positions=positions, decode=True, cache_index=0, mutable=["cache"], logits_to_keep=1, **extra,
        )
        next_position = jnp.sum(attention_mask.astype(jnp.int32), axis=1)
        logits, key_mask, next_position = _repeat_rows((logits[:, -1], key_mask, next_position), copies)
        cache = _repeat_rows(variables["cache"], copies, cache_batch_axis(model.config))
        # Loop-invariant: the loop closes over it, so prompt_len stays a Python int.
        context = {"key_mask": key_mask, "next_position": next_position, "prompt_len": prompt_len}
        return logits, cache, context

    @staticmethod
    def step(model, params, cache, context, tokens, step):
        positions = (context["next_position"] + step)[:, None]
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tokens[:, None], context["key_mask"],
            positions=positions, decode=True, cache_index=context["prompt_len"] + step, mutable=["cache"],
        )
        return logits[:, -1], variables["cache"]


def family_for(model):
    """The adapter for a model built by ``llmjax.models.build_model``."""
    return EncoderDecoderFamily if model_family(model.config).seq2seq else DecoderOnlyFamily
