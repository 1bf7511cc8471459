"""Hugging Face ``LlamaForCausalLM`` <-> llmjax ``Decoder``: config translation and the weight table.

Only what the llmjax decoder computes exactly is accepted: plain RoPE (no scaling), no biases,
SiLU gating. Anything else is refused with the config key that caused it, rather than loaded
into a model that would silently compute something different.
"""

from __future__ import annotations

import re
import warnings

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from llmjax.hf.io import CheckpointError
from llmjax.models.decoder import Decoder, DecoderConfig

MODEL_TYPES = ("llama",)
CONFIG_CLASS = DecoderConfig

# HF tensor name -> llmjax param path, and whether the matrix is transposed on the way
# (torch Linear.weight is [out, in]; llmjax kernels are [in, out]). "{i}" is the layer index.
# lm_head.weight exists only for untied embeddings.
PARAM_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed/embedding", False),
    ("model.layers.{i}.input_layernorm.weight", "layers_{i}/pre_attention_norm/scale", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers_{i}/self_attention/q/kernel", True),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers_{i}/self_attention/k/kernel", True),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers_{i}/self_attention/v/kernel", True),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers_{i}/self_attention/o/kernel", True),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers_{i}/pre_mlp_norm/scale", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers_{i}/mlp/wi_0/kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers_{i}/mlp/wi_1/kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers_{i}/mlp/wo/kernel", True),
    ("model.norm.weight", "final_norm/scale", False),
    ("lm_head.weight", "lm_head/kernel", True),
)

# Buffers some older checkpoints carry; they are recomputed, not learned.
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

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
        raise ValueError(
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


# ----------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------

def _table(config: DecoderConfig) -> list[tuple[str, str, bool]]:
    """PARAM_TABLE expanded over layers, without lm_head for tied embeddings."""
    rows = []
    for hf_name, path, transpose in PARAM_TABLE:
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if "{i}" in hf_name:
            rows += [(hf_name.format(i=i), path.format(i=i), transpose) for i in range(config.num_hidden_layers)]
        else:
            rows.append((hf_name, path, transpose))
    return rows


def _expected_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """llmjax path -> parameter shape, from the module itself (nothing is computed)."""
    model = Decoder(config)
    abstract = jax.eval_shape(
        lambda: nn.meta.unbox(model.init(jax.random.key(0), np.ones((1, 1), np.int32))["params"])
    )
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(abstract, sep="/").items()}


def _check_table_covers_model(rows, expected) -> None:
    table_paths = {path for _, path, _ in rows}
    if table_paths != set(expected):  # a bug in the table, not in the user's files
        raise AssertionError(f"llama table and Decoder params differ: {sorted(table_paths ^ set(expected))}")


def _hf_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
    return tuple(reversed(shape)) if transpose else tuple(shape)


def params_from_hf(tensors: dict[str, np.ndarray], config: DecoderConfig) -> dict:
    """HF tensors (name -> ``[out, in]`` array) -> llmjax params (nested dict of numpy arrays)."""
    rows = _table(config)
    expected = _expected_shapes(config)
    _check_table_covers_model(rows, expected)
    names = {hf_name for hf_name, _, _ in rows}
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        # Some writers store the tied head anyway; accept it only if it really is the embedding.
        if not np.array_equal(np.asarray(tensors["lm_head.weight"]), np.asarray(tensors.get("model.embed_tokens.weight"))):
            raise CheckpointError(
                "config.json has tie_word_embeddings=true but lm_head.weight differs from "
                "model.embed_tokens.weight; set tie_word_embeddings=false in config.json"
            )
        names.add("lm_head.weight")
    missing = sorted(names - set(tensors))
    if missing:
        raise CheckpointError(f"llama checkpoint is missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(n for n in set(tensors) - names if not IGNORED_HF_TENSORS.fullmatch(n))
    if unexpected:
        raise CheckpointError(
            f"llama checkpoint has tensors llmjax does not know: {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}; is config.json (num_hidden_layers, "
            "tie_word_embeddings) the one these weights were saved with?"
        )
    flat = {}
    for hf_name, path, transpose in rows:
        tensor = np.asarray(tensors[hf_name])
        want = _hf_shape(expected[path], transpose)
        if tensor.shape != want:
            raise CheckpointError(f"{hf_name} has shape {tensor.shape}, config.json implies {want}")
        flat[path] = tensor.T if transpose else tensor
    return traverse_util.unflatten_dict(flat, sep="/")


def params_to_hf(params: dict, config: DecoderConfig) -> dict[str, np.ndarray]:
    """llmjax params (nested dict) -> HF tensors (name -> numpy ``[out, in]``)."""
    rows = _table(config)
    expected = _expected_shapes(config)
    _check_table_covers_model(rows, expected)
    flat = {path: np.asarray(value) for path, value in traverse_util.flatten_dict(params, sep="/").items()}
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"params do not match the decoder config: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    tensors = {}
    for hf_name, path, transpose in rows:
        value = flat[path]
        if value.shape != expected[path]:
            raise ValueError(f"param {path} has shape {value.shape}, the config implies {expected[path]}")
        tensors[hf_name] = value.T if transpose else value
    return tensors
