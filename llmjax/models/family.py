"""The model families: one record per family with everything the layers above need to know of it.

Code above the models (loss, generation, evaluation, stages, the loop) never compares family
names: it asks the record. Most of what differs between families is one fact, ``seq2seq``
(an encoder-decoder reads ``encoder_input_tokens`` and starts decoding from a start token; a
decoder-only model continues its prompt), so a new decoder-only family with the same call
contract as ``Decoder`` (or a new encoder-decoder one like ``T5``) reuses the causal (seq2seq)
loss, batch format, generation glue and prompt conventions unchanged.

Adding a family: its config dataclass (``llmjax/model_config.py``, with its ``MODEL_CONFIGS``
entry, which the run config reads without importing JAX), its module file here, one record in
:data:`FAMILIES`, and its Hugging Face mapping module (``llmjax/hf/``, listed in that
package's table, keyed by HF ``model_type``). A test checks that the two name tables agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.model_config import DecoderConfig, T5Config, family_of
from llmjax.models.flops import DECODER_FORMULA, T5_FORMULA, StepFlops, decoder_step_flops, t5_step_flops


@dataclasses.dataclass(frozen=True)
class Family:
    """What one model family is.

    name:           the run config's ``model.family`` and the checkpoint metadata's ``family``
    config_class:   its model-config dataclass
    module:         () -> the flax module class, built as ``module()(config)`` (imported on first use)
    seq2seq:        True for an encoder-decoder (model call ``(input_ids, decoder_input_ids, ...)``,
                    T5 batch features, decoding from ``decoder_start_token_id``); False for a
                    decoder-only model (call ``(input_ids, attention_mask, positions=...)``,
                    ``decoder_*`` features, left-padded prompts that the output repeats)
    step_flops:     ``(config, batch, decoder_length, encoder_length, virtual_tokens) -> StepFlops``: matmul FLOPs of
                    one train step, pure arithmetic on the config (``llmjax.models.flops``)
    flops_formula:  what ``step_flops`` counts, printed beside MFU figures
    width_field:    the config field of the embedding width (``d_model``, ``hidden_size``)
    embedding_path: the token embedding's path in the params, ``[vocab, width]``
    """

    name: str
    config_class: type
    module: Callable[[], type[nn.Module]]
    seq2seq: bool
    step_flops: Callable[..., StepFlops]
    flops_formula: str
    width_field: str
    embedding_path: tuple[str, ...]

    def width(self, config) -> int:
        """The embedding width of ``config``'s model (what a soft prompt row holds)."""
        return getattr(config, self.width_field)

    @property
    def batch_format(self) -> str:
        """The batch contract's format (``llmjax.batch.FORMATS``): ``"seq2seq"`` or ``"causal"``."""
        return "seq2seq" if self.seq2seq else "causal"

    def prompt_ids(self, config, tokenizer, text: str) -> list[int]:
        """The token ids a prompt gives the model, as Hugging Face tokenizers make them: an encoder-decoder
        reads ``text + eos``, a decoder ``bos + text`` (``tokenizer``: ``encode(text, add_eos=...)``)."""
        if self.seq2seq:
            return tokenizer.encode(text, add_eos=True)
        bos = getattr(config, "bos_token_id", None)
        return ([] if bos is None else [bos]) + tokenizer.encode(text, add_eos=False)

    def dummy_inputs(self, batch: int = 1, length: int = 8) -> tuple[jax.Array, ...]:
        """Positional arguments that ``model.init`` needs to build every parameter."""
        ids = jnp.ones((batch, length), jnp.int32)
        return (ids, ids) if self.seq2seq else (ids,)


def _t5_module() -> type[nn.Module]:
    from llmjax.models.t5 import T5

    return T5


def _decoder_module() -> type[nn.Module]:
    from llmjax.models.decoder import Decoder

    return Decoder


def _t5_flops(config: T5Config, batch: int, decoder_length: int, encoder_length: int | None,
              virtual_tokens: int = 0) -> StepFlops:
    if encoder_length is None:
        raise ValueError("T5 FLOPs need encoder_length (the encoder input length)")
    return t5_step_flops(config, batch, encoder_length + virtual_tokens, decoder_length)  # a soft prompt: encoder


def _decoder_flops(config: DecoderConfig, batch: int, decoder_length: int, encoder_length: int | None,
                   virtual_tokens: int = 0) -> StepFlops:
    del encoder_length  # a decoder-only model reads one sequence
    return decoder_step_flops(config, batch, decoder_length, virtual_tokens)


FAMILIES: dict[str, Family] = {
    family.name: family for family in (
        Family("t5", T5Config, _t5_module, seq2seq=True, step_flops=_t5_flops, flops_formula=T5_FORMULA,
               width_field="d_model", embedding_path=("shared", "embedding")),
        Family("decoder", DecoderConfig, _decoder_module, seq2seq=False, step_flops=_decoder_flops,
               flops_formula=DECODER_FORMULA, width_field="hidden_size", embedding_path=("embed", "embedding")),
    )
}
"""Family name -> record; the names and config classes are those of ``MODEL_CONFIGS``."""


def model_family(config) -> Family:
    """The record of a model config instance (``T5Config``, ``DecoderConfig``, ...)."""
    return FAMILIES[family_of(config)]


def step_flops(config, batch: int, decoder_length: int, encoder_length: int | None = None,
               virtual_tokens: int = 0) -> StepFlops:
    """Matmul FLOPs of one train step of ``config``'s model; an encoder-decoder needs ``encoder_length``.
    ``virtual_tokens``: a prompt-tuning soft prompt's length, before the encoder input (T5) or the input."""
    return model_family(config).step_flops(config, batch, decoder_length, encoder_length, virtual_tokens)

