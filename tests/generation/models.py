"""The small random models and prompts the generation tests share (weights from :mod:`llmjax.testing`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmjax.testing import to_llmjax, torch_llama, torch_t5


# Small models for the tests: T5 v1.0 (ReLU, tied), T5 v1.1 (gated GELU, untied), LLaMA with GQA.
SMALL = {
    "t5_v1_0": ("t5", dict(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                           feed_forward_proj="relu")),
    "t5_v1_1": ("t5", dict(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                           feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "llama_gqa": ("decoder", dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)),
}


def small_model(name: str, seed: int, directory: Path, **config_overrides):
    """``(family, torch_model, llmjax_model, params)`` for one of :data:`SMALL`.

    ``config_overrides`` change the llmjax side's config (e.g. ``scan_layers=False``).
    """
    family, config = SMALL[name]
    torch_model = torch_t5(seed, **config) if family == "t5" else torch_llama(seed, **config)
    model, params = to_llmjax(torch_model, directory, **config_overrides)
    return family, torch_model, model, params


def prompts(family: str, seed: int, lengths: list[int], vocab_size: int):
    """Random prompts ``(ids, mask)`` int32 ``[len(lengths), max(lengths)]`` with different lengths.

    T5 pads on the right (encoder input); decoder prompts are left-padded, as generation needs.
    Ids avoid 0 (pad) and 1 (eos) so the padding is the only pad.
    """
    width = max(lengths)
    ids = np.random.default_rng(seed).integers(2, vocab_size, size=(len(lengths), width)).astype(np.int32)
    slots = np.arange(width)[None, :]
    lengths = np.asarray(lengths)[:, None]
    mask = (slots < lengths) if family == "t5" else (slots >= width - lengths)
    return ids * mask, mask.astype(np.int32)
