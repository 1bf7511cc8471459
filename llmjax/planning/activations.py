"""Activation bytes per device of one train step, from the model config, batch, length and remat policy.

Where the formula comes from: the tensors JAX's autodiff keeps for the backward pass of one layer of
``llmjax/models`` (list them with ``jax.ad_checkpoint.print_saved_residuals`` on a layer), counted once
per buffer (a reshape shares its input's buffer) and per token of the device's batch shard. It is the
accounting of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", section 4: ``sbh(34 + 5as/h)`` bytes a GPT layer in 16-bit), redone for this code: RMSNorm
with fp32 statistics, RoPE, grouped-query attention with fp32 softmax, gated MLPs, fp32 logits.

Per token of a layer, ``c`` the compute dtype's bytes (4 fp32, 2 bf16), ``H`` the width, ``Q``/``K``
the query and key/value projection widths, ``F`` the MLP width, ``a`` heads, ``k`` keys attended
(sequence length), all divided by the tensor-parallel size where the rules table splits them:

  every intermediate (remat ``none``):
    RMSNorm, each      (8 + c [+ c if bf16]) H      fp32 input copy and normalized value, outputs
    projections        c (Q + 2K)                  queries, keys, values (after RoPE)
    RoPE tables        16 d_head                    cos and sin of queries and keys, fp32 (decoder)
    attention          (4 + c) a k + 8 a            fp32 softmax, its compute-dtype copy, row sums
    attention output   c Q
    MLP                6 c F gated, 3 c F plain     pre-activations, activation's saved values, product
    dropout masks      1 byte a kept element        (rate > 0: sublayer outputs, MLP hidden, attention)
  remat ``full``: the layer input, c H.
  remat ``save_dots``: layer input c H + matmul outputs: c (Q + 2K) + 4 a k (scores) + c Q (A V)
    + c H (output projection) + (2|1) c F + c H (MLP).
  remat ``save_dots_no_batch``: as save_dots without the two attention products (batch dims).

T5's decoder layers add cross-attention (queries over decoder tokens, keys/values over encoder
tokens). Outside the layers: the embedding output and final norm, the fp32 logits and the softmax the
loss gradient needs (``8 V`` per target token), the fp32 attention bias every layer reads (decoder:
the ``[b, 1, t, t]`` mask; T5: the ``[b, heads, t, k]`` relative-position bias plus mask, and its
gradient). During the backward pass one layer's "working set" is live on top of what was kept: the
larger of what remat recomputes for it (every intermediate less what the policy kept) and the
gradients of its largest intermediates, ``2 * 4 a k`` per attention (softmax output and input, fp32)
plus ``2 c F`` (MLP pre-activations). Without remat only the gradients count; with remat the
recomputed values are freed as the backward pass consumes them, which leaves room for the gradients.

What this leaves out (so XLA's temporary bytes differ; README "Planning a run"): copies of weights in
the compute dtype and fsdp's gathered weights (counted separately, one layer), collectives' buffers,
and the compiler's own choices (fusion, buffer reuse; XLA:CPU computes bf16 in fp32).
"""

from __future__ import annotations

import dataclasses

from llmjax.model_config import REMAT_POLICY_NAMES, DecoderConfig, T5Config, family_of
from llmjax.planning.params import PlanError

FP32 = 4


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What one device computes on: its batch rows and the tensor-parallel split."""

    rows: int            # batch rows per device (global batch / (data * fsdp))
    length: int          # decoder-only: sequence length; T5: decoder (target) length
    encoder_length: int  # T5 only (0 for a decoder-only model)
    tensor: int          # tensor-parallel size
    compute_bytes: int   # 4 (fp32) or 2 (bf16)


@dataclasses.dataclass(frozen=True)
class ActivationBytes:
    """Per-device activation bytes of one train step.

    kept:     saved for the backward pass by every layer under the remat policy, plus the model's
              embedding, head and shared attention bias
    working:  one layer's backward working set: recomputed intermediates or gradients, the larger
    """

    kept: int
    working: int

    @property
    def total(self) -> int:
        return self.kept + self.working


def _split(size: int, tensor: int) -> float:
    return size / tensor


def _norm(width: int, c: int) -> float:
    return (8 + c + (c if c < FP32 else 0)) * width


def _attention_none(c, q, kv, heads, keys, kv_tokens_ratio=1.0):
    """Per query token: projections, softmax and output of one attention (keys/values over kv tokens)."""
    return c * q + 2 * c * kv * kv_tokens_ratio + (FP32 + c) * heads * keys + 8 * heads + c * q


def _attention_dots(c, width, q, kv, heads, keys, batch_dots: bool, kv_tokens_ratio=1.0):
    saved = c * q + 2 * c * kv * kv_tokens_ratio + c * width
    return saved + (FP32 * heads * keys + c * q if batch_dots else 0)


def _mlp_none(c, hidden, gated):
    return (6 if gated else 3) * c * hidden


def _mlp_dots(c, width, hidden, gated):
    return (2 if gated else 1) * c * hidden + c * width


def _dropout(rate, *, width=0, hidden=0, heads=0, keys=0, attentions=0, sublayers=0):
    """Per token: 1-byte keep masks of the dropouts on sublayer outputs, the MLP hidden and attention weights."""
    return (sublayers * width + hidden + attentions * heads * keys) if rate > 0 else 0


def _gradients(c, heads, keys, hidden):
    """Per token: gradients of one attention's softmax (output and input, fp32) and of the MLP pre-activations."""
    return 2 * FP32 * heads * keys + 2 * c * hidden


def _layer(policy, c, width, none, dots, dots_no_batch):
    return {"none": none, "full": c * width, "save_dots": c * width + dots,
            "save_dots_no_batch": c * width + dots_no_batch}[policy]


def _decoder(cfg: DecoderConfig, s: Shapes, policy: str) -> ActivationBytes:
    c, t, tp = s.compute_bytes, s.length, s.tensor
    h, q = cfg.hidden_size, _split(cfg.num_attention_heads * cfg.dim_per_head, tp)
    kv, heads = _split(cfg.kv_heads * cfg.dim_per_head, tp), _split(cfg.num_attention_heads, tp)
    f, vocab = _split(cfg.intermediate_size, tp), _split(cfg.vocab_size, tp)
    none = (2 * _norm(h, c) + _attention_none(c, q, kv, heads, t) + 16 * cfg.dim_per_head
            + _mlp_none(c, f, gated=True) + _dropout(cfg.attention_dropout, heads=heads, keys=t, attentions=1))
    dots = _attention_dots(c, h, q, kv, heads, t, True) + _mlp_dots(c, h, f, True)
    no_batch = _attention_dots(c, h, q, kv, heads, t, False) + _mlp_dots(c, h, f, True)
    per_layer = _layer(policy, c, h, none, dots, no_batch)
    tokens = s.rows * t
    outside = c * h + _norm(h, c) + 2 * FP32 * vocab + FP32 * t  # embedding, final norm, logits, mask bias
    kept = tokens * (cfg.num_hidden_layers * per_layer + outside)
    working = tokens * max(none - per_layer, _gradients(c, heads, t, f))
    return ActivationBytes(int(kept), int(working))


def _t5(cfg: T5Config, s: Shapes, policy: str) -> ActivationBytes:
    c, t, src, tp = s.compute_bytes, s.length, s.encoder_length, s.tensor
    d, inner = cfg.d_model, _split(cfg.num_heads * cfg.d_kv, tp)
    heads, f, vocab = _split(cfg.num_heads, tp), _split(cfg.d_ff, tp), _split(cfg.vocab_size, tp)
    rate, gated = cfg.dropout_rate, cfg.gated
    ratio = src / t  # encoder tokens per decoder token (cross-attention keys and values)
    mlp_none, mlp_dots = _mlp_none(c, f, gated), _mlp_dots(c, d, f, gated)
    enc_none = (2 * _norm(d, c) + _attention_none(c, inner, inner, heads, src) + mlp_none
                + _dropout(rate, width=d, hidden=f, heads=heads, keys=src, attentions=1, sublayers=2))
    enc_dots = _attention_dots(c, d, inner, inner, heads, src, True) + mlp_dots
    enc_no_batch = _attention_dots(c, d, inner, inner, heads, src, False) + mlp_dots
    dec_none = (3 * _norm(d, c) + _attention_none(c, inner, inner, heads, t)
                + _attention_none(c, inner, inner, heads, src, ratio) + mlp_none
                + _dropout(rate, width=d, hidden=f, heads=heads, keys=t, attentions=1, sublayers=3)
                + _dropout(rate, heads=heads, keys=src, attentions=1))
    dec_dots = (_attention_dots(c, d, inner, inner, heads, t, True)
                + _attention_dots(c, d, inner, inner, heads, src, True, ratio) + mlp_dots)
    dec_no_batch = (_attention_dots(c, d, inner, inner, heads, t, False)
                    + _attention_dots(c, d, inner, inner, heads, src, False, ratio) + mlp_dots)
    enc_layer = _layer(policy, c, d, enc_none, enc_dots, enc_no_batch)
    dec_layer = _layer(policy, c, d, dec_none, dec_dots, dec_no_batch)
    enc_tokens, dec_tokens = s.rows * src, s.rows * t
    # Outside the layers: embeddings and final norms; relative-position bias + mask [b, heads, q, k] fp32 and its
    # gradient (summed over layers); the cross-attention mask bias; fp32 logits and softmax.
    enc_outside = c * d + _norm(d, c) + 2 * FP32 * heads * src
    dec_outside = c * d + _norm(d, c) + 2 * FP32 * heads * t + FP32 * src + 2 * FP32 * vocab
    kept = (enc_tokens * (cfg.num_layers * enc_layer + enc_outside)
            + dec_tokens * (cfg.decoder_layers * dec_layer + dec_outside))
    working = max(enc_tokens * max(enc_none - enc_layer, _gradients(c, heads, src, f)),
                  dec_tokens * max(dec_none - dec_layer, _gradients(c, heads, t, f) + 2 * FP32 * heads * src))
    return ActivationBytes(int(kept), int(working))


FAMILY_ACTIVATIONS = {"t5": _t5, "decoder": _decoder}


def activation_bytes(config, shapes: Shapes, policy: str) -> ActivationBytes:
    """Per-device activation bytes of one train step of ``config``'s model under remat ``policy``."""
    if policy not in REMAT_POLICY_NAMES:
        raise PlanError(f"remat policy {policy!r} is not one llmjax has; use one of {list(REMAT_POLICY_NAMES)}")
    return FAMILY_ACTIVATIONS[family_of(config)](config, shapes, policy)
