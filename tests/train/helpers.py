"""Tiny models and random batches shared by the training tests.

Dimensions divide by 8 everywhere a mesh axis may split them (heads, kv heads, mlp, vocab,
embed), so the same model runs on every 8-device mesh shape.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from llmjax.batch import shift_right
from llmjax.models.decoder import DecoderConfig
from llmjax.models.t5 import T5Config

TINY = {
    "t5": T5Config(
        vocab_size=128, d_model=32, d_kv=4, d_ff=64, num_layers=2, num_heads=8, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    ),
    "decoder": DecoderConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=4,
    ),
}


def random_batch(family: str, batch_size: int = 8, encoder_length: int = 12, decoder_length: int = 10,
                 seed: int = 0, vocab_size: int = 128) -> dict[str, np.ndarray]:
    """Unpacked batch with right padding of random lengths (loss weights 0 on padding)."""
    rng = np.random.default_rng(seed)

    def padded(length):
        tokens = rng.integers(3, vocab_size, (batch_size, length)).astype(np.int32)
        lengths = rng.integers(2, length + 1, batch_size)
        valid = np.arange(length)[None, :] < lengths[:, None]
        return np.where(valid, tokens, 0).astype(np.int32), valid.astype(np.int32)

    targets, weights = padded(decoder_length)
    batch = {
        "decoder_target_tokens": targets,
        "decoder_loss_weights": weights,
        "decoder_input_tokens": shift_right(targets, 0),
    }
    if family == "t5":
        batch["encoder_input_tokens"], _ = padded(encoder_length)
    return batch


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``directory``: ``tag -> [(step, value), ...]``.

    Read straight from the TFRecord framing (8-byte length, 4-byte length crc, the ``Event`` protobuf,
    4-byte data crc) with tensorboardX's compiled ``Event`` message, not through the writer under test.
    """
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
