"""Hugging Face <-> llmjax for T5 (v1.0, v1.1, FLAN-T5) and mT5: config translation and the weight table.

The table is data; :mod:`llmjax.hf.mapping` expands and applies it. Projections are transposed
(HF ``[out, in]``, llmjax ``[in, out]``); embeddings, norms and the relative-position table keep
their layout. Tying: llmjax ``tie_word_embeddings=True`` means the v1.0 head (shared embedding,
decoder output scaled by ``d_model**-0.5``); False means v1.1/FLAN/mT5 (own ``lm_head``, no
scaling). transformers >= 5 always ties T5 weights in the config and records the scaling as
``scale_decoder_outputs``.
"""

from __future__ import annotations

from llmjax.hf.io import CheckpointError
from llmjax.hf.mapping import WeightMap, expand, param_shapes
from llmjax.models import build_model  # noqa: F401  (part of the family protocol)
from llmjax.model_config import T5Config

MODEL_TYPES = ("t5", "mt5")
CONFIG_CLASS = T5Config

# ----------------------------------------------------------------------------
# The weight table (data; llmjax.hf.mapping does the rest): (HF name, llmjax path, transpose).
# "{i}" is the layer index, "{p}" the projection.
# ----------------------------------------------------------------------------
_MODEL = (
    ("shared.weight", "shared/embedding", False),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
     "encoder/relative_position_bias/rel_embedding", False),
    ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
     "decoder/relative_position_bias/rel_embedding", False),
    ("encoder.final_layer_norm.weight", "encoder/final_norm/scale", False),
    ("decoder.final_layer_norm.weight", "decoder/final_norm/scale", False),
)
_UNTIED_HEAD = (("lm_head.weight", "lm_head/kernel", True),)
_ENCODER_ATTENTION = (  # {p} in q, k, v, o
    ("encoder.block.{i}.layer.0.layer_norm.weight", "encoder/layers_{i}/self_attention_norm/scale", False),
    ("encoder.block.{i}.layer.0.SelfAttention.{p}.weight", "encoder/layers_{i}/self_attention/{p}/kernel", True),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "encoder/layers_{i}/mlp_norm/scale", False),
)
_DECODER_ATTENTION = (  # {p} in q, k, v, o
    ("decoder.block.{i}.layer.0.layer_norm.weight", "decoder/layers_{i}/self_attention_norm/scale", False),
    ("decoder.block.{i}.layer.0.SelfAttention.{p}.weight", "decoder/layers_{i}/self_attention/{p}/kernel", True),
    ("decoder.block.{i}.layer.1.layer_norm.weight", "decoder/layers_{i}/cross_attention_norm/scale", False),
    ("decoder.block.{i}.layer.1.EncDecAttention.{p}.weight",
     "decoder/layers_{i}/cross_attention/{p}/kernel", True),
    ("decoder.block.{i}.layer.2.layer_norm.weight", "decoder/layers_{i}/mlp_norm/scale", False),
)
_ENCODER_MLP = (("encoder.block.{i}.layer.1.DenseReluDense.{p}.weight", "encoder/layers_{i}/mlp/{p}/kernel", True),)
_DECODER_MLP = (("decoder.block.{i}.layer.2.DenseReluDense.{p}.weight", "decoder/layers_{i}/mlp/{p}/kernel", True),)
_ATTENTION_PROJECTIONS = ("q", "k", "v", "o")
_MLP_PROJECTIONS = {True: ("wi_0", "wi_1", "wo"), False: ("wi", "wo")}  # by config.gated
# HF names that alias the shared embedding, or that HF itself ignores on load.
_IGNORED = (r"(encoder|decoder)\.embed_tokens\.weight"
            r"|decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight")
# config.json keys that decide which tensors exist (named when a checkpoint does not match).
_SHAPE_KEYS = ("num_layers", "num_decoder_layers", "feed_forward_proj", "tie_word_embeddings")

# config.json keys that must be present, and the optional ones copied when present
# (absent ones take the T5Config default, which equals transformers' default).
_REQUIRED_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
_OPTIONAL_KEYS = (
    "num_decoder_layers", "relative_attention_num_buckets", "relative_attention_max_distance",
    "dropout_rate", "layer_norm_epsilon", "feed_forward_proj", "initializer_factor",
    "pad_token_id", "eos_token_id", "decoder_start_token_id",
)
# Per model_type differences: mT5 defaults to gated-GELU and never scales the decoder output.
_MODEL_TYPE_DEFAULTS = {"t5": {}, "mt5": {"feed_forward_proj": "gated-gelu"}}


def weight_map(config: T5Config) -> WeightMap:
    """Every HF tensor of ``config``'s model and its llmjax param (see :mod:`llmjax.hf.mapping`)."""
    mlp = _MLP_PROJECTIONS[config.gated]
    rows = expand(_MODEL + (() if config.tie_word_embeddings else _UNTIED_HEAD))
    for attention, feed_forward, layers in ((_ENCODER_ATTENTION, _ENCODER_MLP, config.num_layers),
                                            (_DECODER_ATTENTION, _DECODER_MLP, config.decoder_layers)):
        rows += expand(attention, i=range(layers), p=_ATTENTION_PROJECTIONS)
        rows += expand(feed_forward, i=range(layers), p=mlp)
    return WeightMap(
        family="T5", rows=tuple(rows), shapes=param_shapes(config), ignored=_IGNORED, config_keys=_SHAPE_KEYS,
        # v1.0 ties the head; transformers >= 5 saves an untied head equal to the embedding as shared.weight only.
        tied={"lm_head.weight": "shared.weight"} if config.tie_word_embeddings else {},
        aliases={"encoder.embed_tokens": "shared", "decoder.embed_tokens": "shared"},
        fallback={} if config.tie_word_embeddings else {"lm_head.weight": "shared.weight"},
        tied_fix=("llmjax cannot run a scaled untied head (scale_decoder_outputs/tie_word_embeddings true); set "
                  "tie_word_embeddings and scale_decoder_outputs to false if this is a v1.1/FLAN model"),
    )


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------

def config_from_hf(hf: dict) -> T5Config:
    """HF ``config.json`` dict -> :class:`T5Config` (fp32); clear errors for what llmjax cannot run."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"config.json model_type={model_type!r} is not a T5 model; llmjax.hf.t5 reads {list(MODEL_TYPES)}"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in hf]
    if missing:
        raise CheckpointError(
            f"config.json is missing required key(s) {missing} for model_type={model_type!r}; "
            "add them (see transformers.T5Config)"
        )
    fields = {**_MODEL_TYPE_DEFAULTS[model_type], **{k: hf[k] for k in _REQUIRED_KEYS + _OPTIONAL_KEYS if k in hf}}
    if fields.get("num_decoder_layers") is None:
        fields.pop("num_decoder_layers", None)
    eos = fields.get("eos_token_id")
    if isinstance(eos, list):
        if len(eos) != 1:
            raise CheckpointError(f"config.json eos_token_id={eos}: llmjax T5 supports exactly one eos token")
        fields["eos_token_id"] = eos[0]
    fields["tie_word_embeddings"] = _scales_decoder_output(hf)
    try:
        return T5Config(**fields)
    except ValueError as e:  # e.g. an activation llmjax does not implement
        raise CheckpointError(f"config.json: {e}") from None


def _scales_decoder_output(hf: dict) -> bool:
    if hf.get("model_type") == "mt5":
        return False
    if "scale_decoder_outputs" in hf:  # written by transformers >= 5
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False  # older configs: untied v1.1 says False


def config_to_hf(config: T5Config) -> dict:
    """:class:`T5Config` -> HF ``config.json`` dict (model_type "t5")."""
    fields = {k: getattr(config, k) for k in _REQUIRED_KEYS + _OPTIONAL_KEYS}
    fields["num_decoder_layers"] = config.decoder_layers
    return {
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "is_encoder_decoder": True,
        "use_cache": True,
        "dtype": config.param_dtype,
        **fields,
        "tie_word_embeddings": config.tie_word_embeddings,
        "scale_decoder_outputs": config.tie_word_embeddings,
    }


def generation_config_to_hf(config: T5Config) -> dict:
    """The token ids ``generate`` needs (``generation_config.json``)."""
    return {
        "decoder_start_token_id": config.decoder_start_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
