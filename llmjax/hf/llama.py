"""Hugging Face ``LlamaForCausalLM`` <-> llmjax ``Decoder``: config translation and the weight table.

Only what the llmjax decoder computes exactly is accepted: plain RoPE (no scaling), no biases,
SiLU gating. Anything else is refused with the config key that caused it, rather than loaded
into a model that would silently compute something different.
"""

from __future__ import annotations

import warnings

from llmjax.hf.io import CheckpointError
from llmjax.hf.mapping import WeightMap, expand, param_shapes
from llmjax.models.decoder import Decoder, DecoderConfig

MODEL_TYPES = ("llama",)
CONFIG_CLASS = DecoderConfig

# The weight table (data; llmjax.hf.mapping does the rest): (HF name, llmjax path, transpose).
# "{i}" is the layer index. lm_head.weight exists only for untied embeddings.
_MODEL = (
    ("model.embed_tokens.weight", "embed/embedding", False),
    ("model.norm.weight", "final_norm/scale", False),
)
_UNTIED_HEAD = (("lm_head.weight", "lm_head/kernel", True),)
_LAYER = (
    ("model.layers.{i}.input_layernorm.weight", "layers_{i}/pre_attention_norm/scale", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers_{i}/self_attention/q/kernel", True),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers_{i}/self_attention/k/kernel", True),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers_{i}/self_attention/v/kernel", True),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers_{i}/self_attention/o/kernel", True),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers_{i}/pre_mlp_norm/scale", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers_{i}/mlp/wi_0/kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers_{i}/mlp/wi_1/kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers_{i}/mlp/wo/kernel", True),
)
# Buffers some older checkpoints carry; they are recomputed, not learned.
_IGNORED = r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
# config.json keys that decide which tensors exist (named when a checkpoint does not match).
_SHAPE_KEYS = ("num_hidden_layers", "tie_word_embeddings")

REQUIRED_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)
# Optional HF keys copied as-is when present (same name in DecoderConfig); absent -> DecoderConfig default.
OPTIONAL_CONFIG_KEYS = (
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "initializer_range", "attention_dropout", "bos_token_id", "pad_token_id",
)
DEFAULT_ROPE_THETA = 10000.0  # LlamaConfig's default when config.json names none


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------

def _refuse(key: str, value, why: str) -> None:
    raise CheckpointError(f"config.json has {key}={value!r}: {why}; llmjax's decoder does not implement it")


def _rope_theta(hf: dict) -> float:
    """Read rope_theta from the transformers-5 ``rope_parameters`` or the older top-level keys."""
    if hf.get("rope_scaling") is not None:
        _refuse("rope_scaling", hf["rope_scaling"], "scaled RoPE (linear/dynamic/yarn/llama3) is unsupported")
    rope = hf.get("rope_parameters")
    if rope is None:
        return float(hf.get("rope_theta", DEFAULT_ROPE_THETA))
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
        _refuse("rope_parameters", rope, "only plain RoPE ({'rope_type': 'default', 'rope_theta': ...}) is supported")
    return float(rope.get("rope_theta", hf.get("rope_theta", DEFAULT_ROPE_THETA)))


def config_from_hf(hf: dict) -> DecoderConfig:
    """HF ``LlamaConfig`` dict (config.json) -> :class:`DecoderConfig`, refusing unsupported features."""
    if hf.get("model_type", "llama") not in MODEL_TYPES:
        raise CheckpointError(f"config.json has model_type={hf.get('model_type')!r}, expected one of {MODEL_TYPES}")
    for key in REQUIRED_CONFIG_KEYS:
        if key not in hf:
            raise CheckpointError(f"config.json is missing required key {key!r} for a llama model")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            _refuse(key, hf[key], "projection biases are unsupported")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        _refuse("hidden_act", hf["hidden_act"], "only SiLU-gated MLPs (hidden_act='silu') are supported")

    fields = {key: hf[key] for key in REQUIRED_CONFIG_KEYS}
    fields.update({key: hf[key] for key in OPTIONAL_CONFIG_KEYS if hf.get(key) is not None})
    fields["rope_theta"] = _rope_theta(hf)
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        # DecoderConfig holds one eos id; generation callers may pass the full list themselves.
        warnings.warn(f"config.json lists several eos_token_id {eos}; llmjax keeps the first, {eos[0]}")
        eos = eos[0] if eos else None
    if eos is not None:
        fields["eos_token_id"] = eos
    return DecoderConfig(**fields)


def config_to_hf(config: DecoderConfig) -> dict:
    """:class:`DecoderConfig` -> config.json dict that ``transformers.LlamaConfig`` reads."""
    if config.hidden_act not in ("silu", "swish"):
        raise CheckpointError(
            f"DecoderConfig.hidden_act={config.hidden_act!r} cannot be exported as a llama model; "
            "Hugging Face llama checkpoints use 'silu'"
        )
    hf = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **{key: getattr(config, key) for key in REQUIRED_CONFIG_KEYS + OPTIONAL_CONFIG_KEYS},
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.dim_per_head,
        "hidden_act": "silu",
        "eos_token_id": config.eos_token_id,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,  # read by transformers < 5
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": config.param_dtype,
    }
    return hf


def build_model(config: DecoderConfig) -> Decoder:
    return Decoder(config)


def weight_map(config: DecoderConfig) -> WeightMap:
    """Every HF tensor of ``config``'s model and its llmjax param (see :mod:`llmjax.hf.mapping`)."""
    rows = expand(_MODEL + (() if config.tie_word_embeddings else _UNTIED_HEAD))
    rows += expand(_LAYER, i=range(config.num_hidden_layers))
    return WeightMap(
        family="llama", rows=tuple(rows), shapes=param_shapes(config), ignored=_IGNORED, config_keys=_SHAPE_KEYS,
        # Some writers store the tied head anyway; it is accepted only if it really is the embedding.
        tied={"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {},
    )
