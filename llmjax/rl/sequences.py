"""(prompt, response) batches and the model outputs RL reads off them, one contract for both families.

A *scored batch* is a dict of int32 numpy/jax arrays:

* ``prompt_ids`` / ``prompt_mask`` ``[B, P]``: what the model is given. T5: ``prompt + eos``, right-padded
  (the encoder input); a decoder: ``bos + prompt``, left-padded (so responses start at one column).
* ``response_ids`` / ``response_mask`` ``[B, T]``: the response tokens, right-padded; the mask is 1 on
  real tokens, the closing eos included.

``response_outputs`` gives logits and hidden states *aligned with the response*: position ``t`` is the
state that predicts ``response_ids[:, t]`` (T5: the decoder after ``start, r_0 .. r_{t-1}``; a decoder:
the token before ``r_t``), which is what token log-probabilities, entropies and a value head read.
``final_hidden`` gives the state after the last real response token (it has read the whole response),
which a reward model scores.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import InputError
from llmjax.evaluate import prompt_ids
from llmjax.models import model_family


class SequenceLengthError(InputError):
    """A prompt or response longer than its configured budget (never cut silently)."""


def _model_kwargs(rng):
    return {"deterministic": True} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}


MIN_BUCKET = 16


def encode_prompts(model, tokenizer, prompts: Sequence[str], length: int, *, what: str = "prompt",
                   bucket: bool = False) -> tuple:
    """``prompts`` -> ``(prompt_ids, prompt_mask)`` int32 ``[B, length]`` padded as the family needs; with
    ``bucket`` the width is the longest prompt's rounded up to a power of two (at least ``MIN_BUCKET``, at most
    ``length``), so short prompts cost little and a run compiles for a few widths only.
    A prompt longer than ``length`` tokens is a :class:`SequenceLengthError` naming it and the setting."""
    seq2seq = model_family(model.config).seq2seq
    encoded = [prompt_ids(model, tokenizer, text) for text in prompts]
    for row, (text, tokens) in enumerate(zip(prompts, encoded)):
        if len(tokens) > length:
            raise SequenceLengthError(f"{what} {row} has {len(tokens)} tokens, over the {length} allowed "
                                      f"({text[:60]!r}...); raise the stage's prompt_length")
    if bucket:
        longest = max(len(tokens) for tokens in encoded)
        length = min(length, max(MIN_BUCKET, 1 << (longest - 1).bit_length()))
    ids = np.full((len(prompts), length), model.config.pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, tokens in enumerate(encoded):
        columns = slice(0, len(tokens)) if seq2seq else slice(length - len(tokens), length)
        ids[row, columns] = tokens
        mask[row, columns] = 1
    return ids, mask


def encode_responses(tokenizer, responses: Sequence[str], length: int, pad_id: int, *,
                     what: str = "response") -> tuple:
    """``responses`` -> ``(response_ids, response_mask)`` int32 ``[B, length]``: each text's tokens and eos,
    right-padded; a response longer than ``length`` tokens is a :class:`SequenceLengthError`."""
    ids = np.full((len(responses), length), pad_id, np.int32)
    mask = np.zeros((len(responses), length), np.int32)
    for row, text in enumerate(responses):
        tokens = tokenizer.encode(text, add_eos=True)
        if len(tokens) > length:
            raise SequenceLengthError(f"{what} {row} has {len(tokens)} tokens (eos included), over the {length} "
                                      f"allowed ({text[:60]!r}...); raise the stage's response_length")
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask


def scored_batch(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, prompt_length: int,
                 response_length: int) -> dict[str, np.ndarray]:
    """The scored batch of ``(prompt, response)`` texts (see the module docstring)."""
    if len(prompts) != len(responses):
        raise InputError(f"{len(prompts)} prompts but {len(responses)} responses; give one response per prompt")
    prompt, prompt_mask = encode_prompts(model, tokenizer, prompts, prompt_length)
    response, response_mask = encode_responses(tokenizer, responses, response_length, model.config.pad_token_id)
    return {"prompt_ids": prompt, "prompt_mask": prompt_mask, "response_ids": response,
            "response_mask": response_mask}


def responses_of_generation(new_tokens, eos_id: int, pad_id: int):
    """Generated tokens ``[B, T]`` (after the prefix) -> ``(response_ids, response_mask)``: each row up to and
    including its first eos; what follows is pad with mask 0. Works on numpy or jax arrays (jittable)."""
    xp = jnp if isinstance(new_tokens, jax.Array) else np
    is_eos = new_tokens == eos_id
    # 1 up to and including the first eos: no eos strictly before this column.
    before = xp.cumsum(is_eos.astype(np.int32), axis=1) - is_eos.astype(np.int32)
    mask = (before == 0).astype(np.int32)
    return xp.where(mask == 1, new_tokens, pad_id).astype(np.int32), mask


def response_outputs(model, params, batch: dict, *, rng=None, soft_prompt=None):
    """``(logits [B, T, V] fp32, hidden [B, T, width])`` aligned with ``response_ids`` (module docstring)."""
    cfg = model.config
    if model_family(cfg).seq2seq:
        start = jnp.full(batch["response_ids"][:, :1].shape, cfg.decoder_start_token_id, jnp.int32)
        decoder_input = jnp.concatenate([start, batch["response_ids"][:, :-1]], axis=1)
        return model.apply({"params": params}, batch["prompt_ids"], decoder_input,
                           attention_mask=batch["prompt_mask"], return_hidden=True, soft_prompt=soft_prompt,
                           **_model_kwargs(rng))
    prompt_length = batch["prompt_ids"].shape[1]
    tokens = jnp.concatenate([batch["prompt_ids"], batch["response_ids"]], axis=1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1)
    logits, hidden = model.apply({"params": params}, tokens, mask, return_hidden=True, soft_prompt=soft_prompt,
                                 **_model_kwargs(rng))
    # Position p predicts token p + 1: the response's tokens are predicted from P - 1 .. P + T - 2.
    span = slice(prompt_length - 1, tokens.shape[1] - 1)
    return logits[:, span], hidden[:, span]


def final_hidden(model, params, batch: dict, *, rng=None):
    """``[B, width]``: the hidden state after the last real response token (after the prompt for an empty
    response), the one a reward head scores."""
    cfg = model.config
    lengths = jnp.sum(batch["response_mask"], axis=1)
    if model_family(cfg).seq2seq:
        start = jnp.full(batch["response_ids"][:, :1].shape, cfg.decoder_start_token_id, jnp.int32)
        decoder_input = jnp.concatenate([start, batch["response_ids"]], axis=1)
        _, hidden = model.apply({"params": params}, batch["prompt_ids"], decoder_input,
                                attention_mask=batch["prompt_mask"], return_hidden=True, **_model_kwargs(rng))
        index = lengths  # decoder slot 0 is the start token: slot n has read n response tokens
    else:
        tokens = jnp.concatenate([batch["prompt_ids"], batch["response_ids"]], axis=1)
        mask = jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1)
        _, hidden = model.apply({"params": params}, tokens, mask, return_hidden=True, **_model_kwargs(rng))
        index = batch["prompt_ids"].shape[1] - 1 + lengths
    return jnp.take_along_axis(hidden, index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
