"""Training FLOPs of one step, counted from the model config, for tokens/s -> MFU.

The count is the matmul work only (what a matrix unit does), forward plus backward:

* every projection ``[in, out]`` applied to ``N`` tokens costs ``2*in*out*N`` forward and twice that
  backward (gradients of the input and of the weight): ``6 * params * tokens``;
* attention scores ``Q K^T`` and the weighted sum ``A V`` cost ``2 * d_attn * keys`` each per query
  token forward, hence ``12 * d_attn * keys`` per query token and layer, forward plus backward;
  the full square is counted even where a causal mask zeroes half of it (both implementations
  compute it);
* embedding lookups, the relative-position bias, norms, softmax and the optimizer update are not
  counted (no matmul). The LM head is counted, tied or not: it is a matmul.

For T5 the encoder and the decoder see different numbers of tokens, so they are counted separately:
encoder layers over encoder tokens; decoder layers (self-attention, cross-attention queries and
output, MLP) and the LM head over decoder tokens; the cross-attention key/value projections over
encoder tokens (they project the encoder output), and cross-attention scores over
``decoder tokens x encoder length``.
"""

from __future__ import annotations

import dataclasses

from llmjax.model_config import DecoderConfig, T5Config

T5_FORMULA = (
    "6*P_enc*N_enc + 12*L_enc*d_attn*S*N_enc                      (encoder)\n"
    "+ 6*P_crosskv*N_enc                                          (cross-attn K,V of encoder output)\n"
    "+ 6*(P_dec + P_head)*N_dec + 12*L_dec*d_attn*(T + S)*N_dec   (decoder self+cross attn, LM head)\n"
    "  P_enc = L_enc*(4*d*d_attn + n_ff*d*d_ff), P_crosskv = L_dec*2*d*d_attn,\n"
    "  P_dec = L_dec*(6*d*d_attn + n_ff*d*d_ff) - P_crosskv, P_head = d*V, n_ff = 3 if gated else 2,\n"
    "  N_enc = batch*S, N_dec = batch*T (prompt tuning: S counts the n virtual tokens);\n"
    "  embedding lookups and relative bias not counted"
)
"""What ``t5_step_flops`` counts, printed beside MFU figures."""

DECODER_FORMULA = (
    "6*(P_layers + P_head)*N + 12*L*d_q*T*N\n"
    "  P_layers = L*(2*d*d_q + 2*d*d_kv + 3*d*d_ff), P_head = d*V, N = batch*T;\n"
    "  prompt tuning: T counts the n virtual tokens, the LM head only batch*(T - n); embedding lookup not counted"
)
"""What ``decoder_step_flops`` counts, printed beside MFU figures."""


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Matmul FLOPs of one training step (forward + backward), split by where they happen."""

    dense: float       # 6 * params * tokens, summed over the parts of the model
    attention: float   # 12 * layers * d_attn * keys * query tokens
    tokens: int        # tokens the model reads per step (T5: encoder + decoder tokens)

    @property
    def total(self) -> float:
        return self.dense + self.attention


def t5_step_flops(config: T5Config, batch: int, encoder_length: int, decoder_length: int) -> StepFlops:
    """FLOPs of one T5 train step on ``[batch, encoder_length]`` inputs and ``[batch, decoder_length]`` targets."""
    d, d_attn, d_ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
    mlp = (3 if config.gated else 2) * d * d_ff
    encoder_tokens, decoder_tokens = batch * encoder_length, batch * decoder_length
    encoder_params = config.num_layers * (4 * d * d_attn + mlp)
    cross_kv_params = config.decoder_layers * 2 * d * d_attn
    # decoder layer: self-attn q,k,v,o + cross-attn q,o (k,v counted on encoder tokens) + MLP
    decoder_params = config.decoder_layers * (6 * d * d_attn + mlp)
    head_params = d * config.vocab_size
    dense = 6 * (
        encoder_params * encoder_tokens
        + cross_kv_params * encoder_tokens
        + (decoder_params + head_params) * decoder_tokens
    )
    attention = 12 * d_attn * (
        config.num_layers * encoder_length * encoder_tokens
        + config.decoder_layers * (decoder_length + encoder_length) * decoder_tokens
    )
    return StepFlops(dense=float(dense), attention=float(attention), tokens=encoder_tokens + decoder_tokens)


def decoder_step_flops(config: DecoderConfig, batch: int, length: int, virtual_tokens: int = 0) -> StepFlops:
    """FLOPs of one decoder-only train step on ``[batch, length]`` tokens after ``virtual_tokens`` soft-prompt
    positions (prompt tuning): the layers see ``length + virtual_tokens`` positions, the LM head the real
    tokens only (the model gives no logits for the virtual ones)."""
    d, d_q, d_kv = config.hidden_size, config.num_attention_heads * config.dim_per_head, \
        config.kv_heads * config.dim_per_head
    positions = length + virtual_tokens
    tokens = batch * positions
    layer_params = 2 * d * d_q + 2 * d * d_kv + 3 * d * config.intermediate_size
    dense = 6 * (config.num_hidden_layers * layer_params * tokens + d * config.vocab_size * batch * length)
    attention = 12 * config.num_hidden_layers * d_q * positions * tokens
    return StepFlops(dense=float(dense), attention=float(attention), tokens=tokens)
