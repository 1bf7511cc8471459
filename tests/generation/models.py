"""Random Hugging Face models with decisive logits, loaded into llmjax through the HF bridge.

Freshly initialized small models tend to give near-flat or degenerate logits (transformers'
T5 init, for one, makes every step pick the same token), and a near-tie between the two best
tokens lets float rounding decide, so torch and XLA could pick differently for reasons that
have nothing to do with decoding. ``decisive_init_`` re-draws every weight at unit scale
(embeddings N(0, 1), matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.2^2), LM head gain 2)
so activations stay O(1) and logits spread by about 2; tests also measure the smallest
top-1/top-2 gap they rely on. Used by the tests and by ``benchmarks/decode.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import transformers

import llmjax.hf

transformers.logging.set_verbosity_error()


def decisive_init_(model: torch.nn.Module, seed: int, head_gain: float = 2.0) -> torch.nn.Module:
    """Re-draw all parameters of a HF T5 / LLaMA model in place (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return std * torch.randn(shape, generator=generator)

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + normal(param.shape, 0.2))
            elif "relative_attention_bias" in name:
                param.copy_(normal(param.shape, 0.5))
            elif "shared" in name or "embed_tokens" in name:
                param.copy_(normal(param.shape, 1.0))
            elif "lm_head" in name:
                param.copy_(normal(param.shape, head_gain / math.sqrt(param.shape[1])))
            else:  # torch Linear weight [out, in]
                param.copy_(normal(param.shape, 1.0 / math.sqrt(param.shape[1])))
    return model.eval()


def torch_t5(seed: int, **config) -> transformers.T5ForConditionalGeneration:
    """Random HF T5 (``config``: ``transformers.T5Config`` fields); untied heads get their own weights."""
    config = transformers.T5Config(**{"dropout_rate": 0.0, "decoder_start_token_id": 0, **config})
    model = transformers.T5ForConditionalGeneration(config)
    if not config.tie_word_embeddings:
        # transformers 5 shares the head tensor with the embedding at construction; untie it.
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.shared.weight))
    return decisive_init_(model, seed)


def torch_llama(seed: int, **config) -> transformers.LlamaForCausalLM:
    """Random HF LLaMA (``config``: ``transformers.LlamaConfig`` fields)."""
    config = transformers.LlamaConfig(**{"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1, **config})
    return decisive_init_(transformers.LlamaForCausalLM(config), seed)


def to_llmjax(torch_model: torch.nn.Module, directory: Path, **config_overrides):
    """Save with transformers (safetensors), read with ``llmjax.hf.from_pretrained`` -> ``(model, params)``."""
    torch_model.save_pretrained(str(directory), safe_serialization=True)
    return llmjax.hf.from_pretrained(directory, **config_overrides)


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
