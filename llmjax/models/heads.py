"""Heads on a model's final hidden states: the reward model's score and the PPO policy's value.

A head is a plain pytree ``{"kernel": [width, outputs], "bias": [outputs]}``, fp32, kept outside the
model's own params (a run's tree holds it under ``llmjax.loading.HEADS_KEY``), so the model code never
changes and a Hugging Face export of the model simply leaves it out. It reads the hidden state after the
final norm (``return_hidden=True`` of both families), upcast to fp32.

* ``score``: reward models (``stage: reward``); ``outputs`` = classes of a classifier (the reward is the
  logit of the wanted class), 1 for a pairwise (Bradley-Terry) model
* ``value``: the PPO policy's value head, one output per response position
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SCORE = "score"
VALUE = "value"


def init_head(key: jax.Array, width: int, outputs: int, std: float | None = None) -> dict:
    """A fresh head: kernel ``[width, outputs]`` drawn N(0, std^2) (default ``1 / sqrt(width + 1)``, small
    enough that the first scores are near 0 whatever the hidden scale), bias 0; fp32."""
    std = 1.0 / np.sqrt(width + 1) if std is None else std
    return {"kernel": std * jax.random.normal(key, (width, outputs), jnp.float32),
            "bias": jnp.zeros((outputs,), jnp.float32)}


def apply_head(head: dict, hidden: jax.Array) -> jax.Array:
    """``hidden [..., width]`` (any dtype) -> ``[..., outputs]`` fp32."""
    return hidden.astype(jnp.float32) @ head["kernel"] + head["bias"]


def head_width(model) -> int:
    """The width of ``model``'s final hidden states (``d_model`` of T5, ``hidden_size`` of a decoder)."""
    from llmjax.models import model_family

    return model_family(model.config).width(model.config)
