"""Loss functions of language models on the batch contract (``llmjax/batch.py``).

Each factory returns a ``LossFn`` (contract in ``llmjax.train.step``): sums over
target tokens, with ``sums["weights"]`` the number of target tokens. It also takes
``soft_prompt=`` (``[n, d_model]``), passed to the model call, so a prompt-tuning run
(``llmjax.stages.adapters``) reuses it.

Compute runs in the model's dtype (bf16 for training); logits and the loss are fp32.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from llmjax.losses import cross_entropy_with_z_loss
from llmjax.models import model_family
from llmjax.train.step import LossFn


def _model_kwargs(rng):
    if rng is None:
        return {"deterministic": True}
    return {"deterministic": False, "rngs": {"dropout": rng}}


def seq2seq_logits(model: nn.Module, params, batch: dict, rng=None, soft_prompt=None):
    """``[B, T, V]`` logits of an encoder-decoder on T5 batch features (``rng`` None: deterministic).

    Unpacked batches mask encoder padding with ``encoder_input_tokens != pad``; the
    decoder needs no padding mask (padding is at the end, causality hides it, and
    ``decoder_loss_weights`` is 0 there). Packed batches use segment ids and positions.
    """
    packed = "encoder_segment_ids" in batch
    padding_mask = (batch["encoder_input_tokens"] != model.config.pad_token_id).astype(jnp.int32)
    return model.apply(
        {"params": params},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        attention_mask=None if packed else padding_mask,
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"),
        soft_prompt=soft_prompt,
        **_model_kwargs(rng),
    )


def causal_lm_logits(model: nn.Module, params, batch: dict, rng=None, soft_prompt=None):
    """``[B, T, V]`` logits of a decoder-only model on ``decoder_*`` batch features."""
    return model.apply(
        {"params": params},
        batch["decoder_input_tokens"],
        None,
        positions=batch.get("decoder_positions"),
        segment_ids=batch.get("decoder_segment_ids"),
        soft_prompt=soft_prompt,
        **_model_kwargs(rng),
    )


def lm_logits(model: nn.Module, params, batch: dict, rng=None, soft_prompt=None):
    """The logits of ``model``'s kind on the batch contract: seq2seq for an encoder-decoder, else causal."""
    forward = seq2seq_logits if model_family(model.config).seq2seq else causal_lm_logits
    return forward(model, params, batch, rng, soft_prompt)


def seq2seq_loss_fn(model: nn.Module, z_loss: float = 0.0, label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy (+ z-loss) of an encoder-decoder on T5 batch features (:func:`seq2seq_logits`)."""

    def loss_fn(params, batch, rng, soft_prompt=None):
        return _token_loss(seq2seq_logits(model, params, batch, rng, soft_prompt), batch, z_loss, label_smoothing)

    return loss_fn


def causal_lm_loss_fn(model: nn.Module, z_loss: float = 0.0, label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy (+ z-loss) of a decoder-only model on ``decoder_*`` batch features."""

    def loss_fn(params, batch, rng, soft_prompt=None):
        return _token_loss(causal_lm_logits(model, params, batch, rng, soft_prompt), batch, z_loss, label_smoothing)

    return loss_fn


def _token_loss(logits, batch, z_loss, label_smoothing):
    objective, z, weights = cross_entropy_with_z_loss(
        logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"], z_loss, label_smoothing
    )
    # "loss" is the cross-entropy alone, comparable across z-loss settings.
    return objective, {"loss": objective - z, "z_loss": z, "weights": weights}


def lm_loss_fn(model: nn.Module, z_loss: float = 0.0, label_smoothing: float = 0.0) -> LossFn:
    """The language-model loss of ``model``'s kind: seq2seq for an encoder-decoder, else causal."""
    factory = seq2seq_loss_fn if model_family(model.config).seq2seq else causal_lm_loss_fn
    return factory(model, z_loss, label_smoothing)
