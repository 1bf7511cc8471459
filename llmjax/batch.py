"""The batch contract: t5x feature names, their dtypes and shapes, and their validation.

A batch is a dict of rank-2 arrays ``[batch, length]``, in one of two formats (a model family's
``batch_format``, ``llmjax.models.family``; the data pipeline knows formats, not models):

* ``"seq2seq"`` (encoder-decoder, e.g. T5): ``encoder_input_tokens``, ``decoder_input_tokens``,
  ``decoder_target_tokens``, ``decoder_loss_weights``; packed batches add ``encoder_segment_ids``,
  ``decoder_segment_ids``, ``encoder_positions``, ``decoder_positions``.
* ``"causal"`` (decoder-only): the ``decoder_*`` names only.

Tokens, segment ids and positions are int32 (segment ids are 1-based, 0 marks padding; positions restart
at 0 in every segment). Loss weights are int32 (0/1) or float32 (weighted losses).

This module imports no jax: it works on anything with ``.shape`` and ``.dtype`` (numpy or jax arrays).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

ENCODER_FEATURES = ("encoder_input_tokens",)
DECODER_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
ENCODER_PACKING_FEATURES = ("encoder_segment_ids", "encoder_positions")
DECODER_PACKING_FEATURES = ("decoder_segment_ids", "decoder_positions")

FORMATS = ("seq2seq", "causal")
LOSS_WEIGHT_DTYPES = (np.dtype(np.int32), np.dtype(np.float32))


def required_features(batch_format: str) -> tuple[str, ...]:
    """Features every batch of ``batch_format`` must carry."""
    _check_format(batch_format)
    return (ENCODER_FEATURES if batch_format == "seq2seq" else ()) + DECODER_FEATURES


def packing_features(batch_format: str) -> tuple[str, ...]:
    """Features a packed batch of ``batch_format`` carries on top of ``required_features``."""
    _check_format(batch_format)
    return (ENCODER_PACKING_FEATURES if batch_format == "seq2seq" else ()) + DECODER_PACKING_FEATURES


def is_packed(batch: Mapping[str, Any]) -> bool:
    """True when the batch carries segment ids (several examples may share a row)."""
    return "decoder_segment_ids" in batch


def validate_batch(
    batch: Mapping[str, Any],
    batch_format: str,
    batch_size: int | None = None,
    lengths: Mapping[str, int] | None = None,
) -> None:
    """Raise ``ValueError`` naming the first way ``batch`` breaks the contract.

    Args:
      batch: feature name -> array ``[batch, length]``.
      batch_format: ``"seq2seq"`` or ``"causal"``.
      batch_size: if given, the leading dimension every feature must have.
      lengths: if given, ``{"encoder": n, "decoder": m}`` (either key optional): the length every
        ``encoder_*`` / ``decoder_*`` feature must have.
    """
    required = required_features(batch_format)
    packing = packing_features(batch_format)

    missing = [name for name in required if name not in batch]
    if missing:
        raise ValueError(
            f"{batch_format} batch is missing feature(s) {missing}; "
            f"it needs {list(required)} (plus {list(packing)} when packed)"
        )
    unknown = sorted(set(batch) - set(required) - set(packing))
    if unknown:
        hint = " (causal batches use decoder_* names only)" if batch_format == "causal" else ""
        raise ValueError(
            f"{batch_format} batch has unknown feature(s) {unknown}{hint}; "
            f"allowed: {list(required) + list(packing)}"
        )
    present_packing = [name for name in packing if name in batch]
    if present_packing and len(present_packing) != len(packing):
        absent = [name for name in packing if name not in batch]
        raise ValueError(
            f"packed batch has {present_packing} but is missing {absent}: "
            "a packed batch needs segment ids and positions for every side"
        )

    for name in batch:
        _check_array(name, batch[name])

    side_lengths: dict[str, tuple[str, int]] = {}
    first_name, first_shape = next((n, tuple(batch[n].shape)) for n in batch)
    for name, array in batch.items():
        shape = tuple(array.shape)
        if shape[0] != first_shape[0]:
            raise ValueError(
                f"inconsistent batch sizes: {name!r} has shape {shape} but {first_name!r} has {first_shape}"
            )
        side = name.split("_", 1)[0]  # "encoder" or "decoder"
        if side in side_lengths and side_lengths[side][1] != shape[1]:
            other, other_length = side_lengths[side]
            raise ValueError(
                f"inconsistent {side} lengths: {name!r} has length {shape[1]} but {other!r} has {other_length}"
            )
        side_lengths.setdefault(side, (name, shape[1]))

    if batch_size is not None and first_shape[0] != batch_size:
        raise ValueError(f"expected batch size {batch_size}, got {first_shape[0]} (feature {first_name!r})")
    for side, expected in (lengths or {}).items():
        if side not in ("encoder", "decoder"):
            raise ValueError(f"lengths keys must be 'encoder' or 'decoder', got {side!r}")
        if side not in side_lengths:
            raise ValueError(f"lengths names side {side!r} but a {batch_format} batch has no {side}_* features")
        name, actual = side_lengths[side]
        if actual != expected:
            raise ValueError(f"expected {side} length {expected}, got {actual} (feature {name!r})")


def shift_right(targets: Any, start_id: int, segment_ids: Any | None = None) -> Any:
    """Decoder inputs from targets: ``inputs[..., 0] = start_id``, ``inputs[..., i] = targets[..., i-1]``.

    Args:
      targets: int array ``[..., length]`` (numpy, or jax inside or outside jit).
      start_id: the decoder start token (T5: the pad id 0).
      segment_ids: optional ``[..., length]`` segment ids of a packed row; the first token of every
        segment then gets ``start_id`` too, so no segment sees the previous segment's last token.
    Returns:
      An array of the same shape, dtype and array library as ``targets``.
    """
    xp = np if isinstance(targets, np.ndarray) else _jax_numpy()
    start = xp.full(targets.shape[:-1] + (1,), start_id, dtype=targets.dtype)
    shifted = xp.concatenate([start, targets[..., :-1]], axis=-1)
    if segment_ids is None:
        return shifted
    previous_segment = xp.concatenate([xp.zeros_like(segment_ids[..., :1]), segment_ids[..., :-1]], axis=-1)
    return xp.where(segment_ids == previous_segment, shifted, xp.asarray(start_id, dtype=targets.dtype))


def _check_format(batch_format: str) -> None:
    if batch_format not in FORMATS:
        raise ValueError(f"batch format must be one of {FORMATS}, got {batch_format!r}")


def _check_array(name: str, array: Any) -> None:
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise ValueError(f"feature {name!r} must be an array, got {type(array).__name__}")
    if len(array.shape) != 2:
        raise ValueError(f"feature {name!r} must have rank 2 [batch, length], got shape {tuple(array.shape)}")
    dtype = np.dtype(array.dtype)
    if name == "decoder_loss_weights":
        if dtype not in LOSS_WEIGHT_DTYPES:
            raise ValueError(f"feature {name!r} must be int32 or float32, got {dtype}")
    elif dtype != np.int32:
        raise ValueError(f"feature {name!r} must be int32, got {dtype}; cast it with .astype(np.int32)")


def _jax_numpy():
    # Imported lazily so the data pipeline (pure numpy) never pulls in jax.
    import jax.numpy as jnp

    return jnp
