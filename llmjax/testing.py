"""Random Hugging Face models with decisive logits, loaded into llmjax through the HF bridge.

Needs torch and transformers (the ``test`` extra); nothing in llmjax imports this module.

Freshly initialized small models tend to give near-flat or degenerate logits (transformers'
T5 init, for one, makes every step pick the same token), and a near-tie between the two best
tokens lets float rounding decide, so torch and XLA could pick differently for reasons that
have nothing to do with decoding. ``decisive_init_`` re-draws every weight at unit scale
(embeddings N(0, 1), matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.2^2), LM head gain 2)
so activations stay O(1) and logits spread by about 2; tests also measure the smallest
top-1/top-2 gap they rely on. Used by the tests (``tests/generation/models.py``) and by ``benchmarks/decode.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

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
    untied = config.get("tie_word_embeddings") is False
    config = transformers.T5Config(**{"dropout_rate": 0.0, "decoder_start_token_id": 0, **config})
    model = transformers.T5ForConditionalGeneration(config)
    if untied:
        # transformers 5 reads the tie_word_embeddings argument as scale_decoder_outputs and still ties the head
        # tensor to the embedding. An untied head (v1.1, FLAN-T5) is its own weight while the encoder's and the
        # decoder's input embeddings stay the shared one: untie the head alone, and say so in the config so that
        # saving keeps it.
        model.config.tie_word_embeddings = False
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

