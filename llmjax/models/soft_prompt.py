"""Soft prompts: trained embeddings put before a model's input embeddings (prompt tuning).

Both families take ``soft_prompt=`` in their call: ``[n, d_model]`` (one prompt for every row) or
``[batch, n, d_model]``. The model concatenates it in front of the embedded tokens, exactly as
Hugging Face PEFT concatenates its prompt embeddings to ``inputs_embeds``, so the ``n`` virtual tokens
take positions ``0 .. n-1`` and the real tokens shift by ``n``; the attention mask grows by ``n`` ones.
These helpers are the pieces both models share; ``llmjax.prompt_tuning`` makes, saves and loads prompts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def prompt_length(soft_prompt: jax.Array | None) -> int:
    """``n``, the number of virtual tokens (0 for None)."""
    return 0 if soft_prompt is None else soft_prompt.shape[-2]


def check_soft_prompt(soft_prompt: jax.Array, batch: int, d_model: int) -> None:
    """Shape checks of a model call's ``soft_prompt`` (a ValueError saying what was expected)."""
    shape = tuple(soft_prompt.shape)
    if soft_prompt.ndim not in (2, 3) or shape[-1] != d_model or shape[-2] < 1:
        raise ValueError(f"soft_prompt must be [n, d_model={d_model}] or [batch, n, d_model] with n >= 1, "
                         f"got shape {shape}")
    if soft_prompt.ndim == 3 and shape[0] not in (1, batch):
        raise ValueError(f"soft_prompt has batch {shape[0]} but the input has batch {batch}; give one prompt "
                         "[n, d_model] for every row or one per row [batch, n, d_model]")
    if not jnp.issubdtype(soft_prompt.dtype, jnp.floating):
        raise ValueError(f"soft_prompt must hold floats, got dtype {soft_prompt.dtype}")


def prepend(soft_prompt: jax.Array, embedded: jax.Array) -> jax.Array:
    """``[b, n + t, d]``: the prompt (cast to the embeddings' compute dtype, as PEFT casts it) before
    ``embedded [b, t, d]``."""
    batch = embedded.shape[0]
    prompt = soft_prompt if soft_prompt.ndim == 3 else soft_prompt[None]
    prompt = jnp.broadcast_to(prompt, (batch, *prompt.shape[1:])).astype(embedded.dtype)
    return jnp.concatenate([prompt, embedded], axis=1)


def extend_mask(mask: jax.Array | None, n: int) -> jax.Array | None:
    """``[b, t]`` key validity -> ``[b, n + t]`` with the virtual tokens valid; None (all valid) stays None."""
    if mask is None or n == 0:
        return mask
    mask = jnp.asarray(mask)
    return jnp.concatenate([jnp.ones((mask.shape[0], n), mask.dtype), mask], axis=1)


def extend_positions(positions: jax.Array, n: int) -> jax.Array:
    """Real tokens' positions ``[b|1, t]`` -> ``[b|1, n + t]`` with the virtual tokens at ``0 .. n-1``."""
    virtual = jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype)[None], (positions.shape[0], n))
    return jnp.concatenate([virtual, positions], axis=1)
