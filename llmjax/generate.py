"""Text generation for both model families: greedy, sampling and beam search with a KV cache.

``generate(model, params, input_ids, attention_mask, rng=..., max_new_tokens=..., ...)``
takes Hugging Face ``generate`` keyword names and returns what ``transformers`` returns:
int32 ``[batch * num_return_sequences, prefix + new]`` where the prefix is the decoder
start token (T5) or the left-padded prompt (decoder), and positions after a finished
sequence hold the pad token. The whole decoding loop is one jitted ``lax.while_loop``
with fixed shapes; it stops early once every sequence is done, and the compiled program
is reused by every call with the same model, settings and input shapes.

Works unchanged on a sharded model: pass params (and inputs) placed on a mesh and the
jitted loop runs under those shardings.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.generation.beam import BeamSettings, beam_results, beam_search_open, beam_step, init_beam_state
from llmjax.generation.config import GenerationConfig
from llmjax.generation.families import family_for, take_cache_rows, unrolled_layers
from llmjax.generation.processors import TokenHistory, greedy_tokens, process_scores
from llmjax.models import model_family
from llmjax.models.soft_prompt import check_soft_prompt

__all__ = ["GenerationConfig", "generate", "resolve_config"]


def resolve_config(model, generation_config: GenerationConfig | None = None, **kwargs) -> GenerationConfig:
    """Settings for one ``generate`` call: keyword arguments over ``generation_config`` over defaults.

    Token ids left unset come from the model config (``eos_token_id``, ``pad_token_id``,
    and for T5 ``decoder_start_token_id``); a missing pad becomes the first eos, as in
    Hugging Face.
    """
    base = generation_config if generation_config is not None else GenerationConfig()
    names = [f.name for f in dataclasses.fields(GenerationConfig)]
    for key in kwargs:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"generate() got an unknown generation argument {key!r}{hint}")
    config = dataclasses.replace(base, **kwargs)
    model_config = model.config
    fill = {}
    for name in ("eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if getattr(config, name) is None and getattr(model_config, name, None) is not None:
            fill[name] = getattr(model_config, name)
    config = dataclasses.replace(config, **fill)
    if config.pad_token_id is None and config.eos_token_id is not None:
        config = dataclasses.replace(config, pad_token_id=config.eos_token_id[0])
    if model_family(model_config).seq2seq and config.decoder_start_token_id is None:
        raise ValueError("generate: an encoder-decoder needs decoder_start_token_id "
                         "(set it in the model or generation config)")
    return config


def generate(
    model,
    params,
    input_ids,
    attention_mask=None,
    *,
    rng: jax.Array | int | None = None,
    generation_config: GenerationConfig | None = None,
    soft_prompt: jax.Array | None = None,
    **kwargs,
) -> jax.Array:
    """Decode continuations of ``input_ids``.

    Args:
      model: a ``T5`` or ``Decoder`` built by ``llmjax.models.build_model``.
      params: its parameters (plain nested dict; may be sharded over a mesh). Put host
        (numpy) params on the device once, ``jax.device_put(params)``, before many calls.
        The loop runs the layers unrolled: with ``scan_layers`` each call first copies the stacked
        layer weights apart (held while decoding); a model built with ``scan_layers=False`` (e.g.
        ``llmjax.hf.from_pretrained(path, scan_layers=False)``) skips that copy.
      input_ids: ``[batch, length]`` int. Decoder prompts must be left-padded.
      attention_mask: ``[batch, length]`` 1 = token, 0 = pad. Default as in Hugging Face:
        ``input_ids != pad_token_id`` when the pad token occurs and is not an eos, else ones.
      rng: a ``jax.random.key`` or an int seed; required when ``do_sample=True`` (same key,
        same output).
      soft_prompt: ``[n, d_model]`` or ``[batch, n, d_model]`` prompt-tuning embeddings put before every
        prompt (T5: the encoder input), as ``peft``'s prompt-tuning models generate; None: none.
      generation_config: a :class:`GenerationConfig`; ``kwargs`` (Hugging Face names:
        ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``repetition_penalty``, ``no_repeat_ngram_size``, ``num_beams``, ``length_penalty``,
        ``early_stopping``, ``eos_token_id``, ...) override it. The two repetition settings read the
        sequence as Hugging Face does: T5's decoder tokens from the start token on; a decoder's prompt
        too (``no_repeat_ngram_size`` counts its left padding, ``repetition_penalty`` skips it).

    Returns:
      int32 ``[batch * num_return_sequences, prefix + new_tokens]``, the same array
      ``transformers``' ``generate`` returns for the same model and settings.
    """
    config = resolve_config(model, generation_config, **kwargs)
    family = family_for(model)
    input_ids, attention_mask = _check_inputs(model, config, input_ids, attention_mask)
    prefix = family.prefix(input_ids, config.decoder_start_token_id)
    max_new_tokens = config.new_tokens(prefix.shape[1])
    if config.do_sample:
        if rng is None:
            raise ValueError("generate: do_sample=True needs rng, e.g. rng=jax.random.key(0) or rng=0")
        if isinstance(rng, int):
            rng = jax.random.key(rng)
    else:
        rng = jax.random.key(0)  # unused; keeps one call signature for the compiled loop
    if soft_prompt is not None:
        soft_prompt = jnp.asarray(soft_prompt)
        check_soft_prompt(soft_prompt, input_ids.shape[0], model_family(model.config).width(model.config))
    tokens, new_length = _decode_loop(
        params, input_ids, attention_mask, rng, soft_prompt, model=model, config=config,
        max_new_tokens=max_new_tokens,
    )
    copies = config.num_return_sequences
    prefix = jnp.repeat(prefix, copies, axis=0) if copies > 1 else prefix
    return jnp.concatenate([prefix, tokens[:, : int(new_length)]], axis=1)


def _check_inputs(model, config, input_ids, attention_mask):
    ids = np.asarray(jax.device_get(input_ids))
    if ids.ndim != 2:
        raise ValueError(f"generate: input_ids must be [batch, length], got shape {ids.shape}; "
                         "for one prompt pass input_ids[None]")
    if ids.shape[1] == 0:
        raise ValueError("generate: input_ids has length 0; give at least one prompt token")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"generate: input_ids must be integer token ids, got dtype {ids.dtype}")
    vocab = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"generate: input_ids hold ids outside [0, {vocab}) (min {ids.min()}, max {ids.max()}); "
                         "does the tokenizer match the model?")
    if attention_mask is None:
        mask = np.ones_like(ids)
        pad, eos = config.pad_token_id, config.eos_token_id or ()
        if pad is not None and pad not in eos and (ids == pad).any():
            mask = (ids != pad).astype(np.int32)
        attention_mask = mask
    else:
        mask = np.asarray(jax.device_get(attention_mask))
        if mask.shape != ids.shape:
            raise ValueError(f"generate: attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("generate: attention_mask must hold only 0 (pad) and 1 (token)")
    if not model_family(model.config).seq2seq:
        if (np.diff(mask.astype(np.int32), axis=1) < 0).any():
            raise ValueError("generate: decoder prompts must be left-padded (pads before the tokens); "
                             "tokenize with padding_side='left'")
        if (mask.sum(axis=1) == 0).any():
            raise ValueError("generate: a prompt row has no tokens (attention_mask all 0)")
    # jax.Array inputs keep their placement (e.g. sharded over a mesh); host arrays go to the default device.
    return _as_int32(input_ids), _as_int32(attention_mask)


def _as_int32(x) -> jax.Array:
    return x.astype(jnp.int32) if isinstance(x, jax.Array) else jnp.asarray(x, jnp.int32)


# ----------------------------------------------------------------------------
# The two searches, each a pure (init, step, open, results) over fixed-shape state
# ----------------------------------------------------------------------------

class _SampleState(NamedTuple):
    tokens: jax.Array    # [N, T] int32 new tokens (pad after eos)
    finished: jax.Array  # [N] bool


class _Prefix(NamedTuple):
    """What every output row starts with, one row per decoded row: ``tokens [N, L]`` int32 (decoder: the
    prompt; T5: the decoder start token) and ``first [N]`` int32, its first real (not padding) column."""

    tokens: jax.Array
    first: jax.Array

    def history(self, new_tokens: jax.Array, step, config: GenerationConfig) -> TokenHistory | None:
        """The sequence so far once ``step`` of ``new_tokens [N, T]`` are in (see ``TokenHistory``); None
        when no processor of ``config`` reads it."""
        if not config.reads_history:
            return None
        tokens = jnp.concatenate([self.tokens, new_tokens], axis=1)
        return TokenHistory(tokens, self.tokens.shape[1] + step, self.first)


class _TokenSearch:
    """Greedy or sampling: one token per row per step; finished rows emit pad."""

    def __init__(self, config: GenerationConfig, max_new_tokens: int, prefix: _Prefix):
        self.config, self.max_new_tokens, self.prefix = config, max_new_tokens, prefix

    def init(self, rows: int) -> _SampleState:
        fill = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        return _SampleState(jnp.full((rows, self.max_new_tokens), fill, jnp.int32), jnp.zeros((rows,), bool))

    def step(self, state, logits, step, key):
        """-> (state, tokens to feed [N], cache row order [N] or None)."""
        cfg = self.config
        scores = process_scores(logits, step, cfg, history=self.prefix.history(state.tokens, step, cfg))
        if cfg.do_sample:
            token = jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)
        else:
            token = greedy_tokens(scores)
        finished = state.finished
        if cfg.eos_token_id is not None:
            token = jnp.where(finished, cfg.pad_token_id, token)
            finished = finished | jnp.isin(token, jnp.asarray(cfg.eos_token_id))
        tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], step, axis=1)
        return _SampleState(tokens, finished), token, None

    def open(self, state):
        return ~jnp.all(state.finished)

    def results(self, state, steps):
        return state.tokens, steps


class _BeamSearch:
    """Beam search (and beam sampling when ``do_sample``), see :mod:`llmjax.generation.beam`."""

    def __init__(self, config: GenerationConfig, max_new_tokens: int, prefix: _Prefix):
        self.config, self.prefix = config, prefix
        eos = config.eos_token_id
        # Hugging Face fills unused positions with `pad or eos[0]` (so pad id 0 falls through to eos).
        fill = (config.pad_token_id or eos[0]) if eos is not None else -1
        self.settings = BeamSettings(
            num_beams=config.num_beams, max_new_tokens=max_new_tokens, eos_token_id=eos,
            length_penalty=float(config.length_penalty), early_stopping=config.early_stopping,
            fill_token_id=fill,
        )
        self.min_tokens_to_keep = (len(eos) if eos else 1) + 1 if config.do_sample else 1

    def init(self, rows: int):
        return init_beam_state(rows // self.config.num_beams, self.settings)

    def step(self, state, logits, step, key):
        k = self.config.num_beams
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        running = state.running_tokens.reshape(-1, state.running_tokens.shape[-1])  # row b * K + beam
        log_probs = process_scores(log_probs, step, self.config, min_tokens_to_keep=self.min_tokens_to_keep,
                                   history=self.prefix.history(running, step, self.config))
        log_probs = log_probs.reshape(-1, k, log_probs.shape[-1])
        state, source_beam = beam_step(
            state, log_probs, step, self.settings, key if self.config.do_sample else None
        )
        feed = jax.lax.dynamic_index_in_dim(state.running_tokens, step, axis=2, keepdims=False).reshape(-1)
        rows = (jnp.arange(source_beam.shape[0])[:, None] * k + source_beam).reshape(-1)
        return state, feed, rows

    def open(self, state):
        return beam_search_open(state, self.settings)

    def results(self, state, steps):
        tokens, lengths = beam_results(state, self.config.num_return_sequences)
        return tokens, jnp.max(lengths)


def _decode_loop_impl(params, input_ids, attention_mask, rng, soft_prompt, *, model, config, max_new_tokens):
    """-> (new tokens ``[N, max_new_tokens]`` int32, number of leading columns that are output)."""
    family = family_for(model)
    model, params = unrolled_layers(model, params)
    beam = config.num_beams > 1
    copies = config.num_beams if beam else config.num_return_sequences
    prefix = _Prefix(family.prefix(input_ids, config.decoder_start_token_id), family.prefix_first(attention_mask))
    prefix = _Prefix(*(jnp.repeat(x, copies, axis=0) for x in prefix)) if copies > 1 else prefix
    search = (_BeamSearch if beam else _TokenSearch)(config, max_new_tokens, prefix)
    logits, cache, context = family.prefill(
        model, params, input_ids, attention_mask, copies, max_new_tokens, config.decoder_start_token_id, soft_prompt
    )
    state, feed, rows = search.step(search.init(logits.shape[0]), logits, 0, jax.random.fold_in(rng, 0))

    def keep_going(carry):
        step, state = carry[0], carry[1]
        return (step < max_new_tokens) & search.open(state)

    def one_token(carry):
        step, state, cache, feed, rows = carry
        if rows is not None:  # beams were reordered: their caches follow them
            cache = take_cache_rows(model, cache, rows)
        logits, cache = family.step(model, params, cache, context, feed, step - 1)
        state, feed, rows = search.step(state, logits, step, jax.random.fold_in(rng, step))
        return step + 1, state, cache, feed, rows

    carry = (jnp.asarray(1, jnp.int32), state, cache, feed, rows)
    steps, state, *_ = jax.lax.while_loop(keep_going, one_token, carry)
    return search.results(state, steps)


_decode_loop = jax.jit(_decode_loop_impl, static_argnames=("model", "config", "max_new_tokens"))
