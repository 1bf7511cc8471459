"""Hugging Face <-> llmjax for T5 (v1.0, v1.1, FLAN-T5) and mT5: config and one weight-name table.

HF ``nn.Linear`` stores ``weight [out, in]``; llmjax ``Dense`` stores ``kernel [in, out]``,
so every projection is transposed. Embeddings, norms and the relative-position
table keep their layout. Tying: llmjax ``tie_word_embeddings=True`` means the
v1.0 head (shared embedding, decoder output scaled by ``d_model**-0.5``); False
means v1.1/FLAN/mT5 (own ``lm_head``, no scaling). transformers >= 5 always ties
T5 weights in the config and records the scaling as ``scale_decoder_outputs``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from llmjax.hf.io import CheckpointError
from llmjax.models import build_model, dummy_inputs  # noqa: F401  (build_model is part of the family protocol)
from llmjax.model_config import T5Config

MODEL_TYPES = ("t5", "mt5")
CONFIG_CLASS = T5Config

# ----------------------------------------------------------------------------
# The mapping table: (HF name, llmjax path, transpose). "{i}" is the layer index;
# "{p}" is the projection (q, k, v, o / wi, wi_0, wi_1, wo).
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
_ATTENTION_PROJECTIONS = ("q", "k", "v", "o")
_ENCODER_LAYER = (
    ("encoder.block.{i}.layer.0.layer_norm.weight", "encoder/layers_{i}/self_attention_norm/scale", False),
    ("encoder.block.{i}.layer.0.SelfAttention.{p}.weight", "encoder/layers_{i}/self_attention/{p}/kernel", True),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "encoder/layers_{i}/mlp_norm/scale", False),
    ("encoder.block.{i}.layer.1.DenseReluDense.{p}.weight", "encoder/layers_{i}/mlp/{p}/kernel", True),
)
_DECODER_LAYER = (
    ("decoder.block.{i}.layer.0.layer_norm.weight", "decoder/layers_{i}/self_attention_norm/scale", False),
    ("decoder.block.{i}.layer.0.SelfAttention.{p}.weight", "decoder/layers_{i}/self_attention/{p}/kernel", True),
    ("decoder.block.{i}.layer.1.layer_norm.weight", "decoder/layers_{i}/cross_attention_norm/scale", False),
    ("decoder.block.{i}.layer.1.EncDecAttention.{p}.weight",
     "decoder/layers_{i}/cross_attention/{p}/kernel", True),
    ("decoder.block.{i}.layer.2.layer_norm.weight", "decoder/layers_{i}/mlp_norm/scale", False),
    ("decoder.block.{i}.layer.2.DenseReluDense.{p}.weight", "decoder/layers_{i}/mlp/{p}/kernel", True),
)
# HF names that alias a mapped tensor (tied embeddings) or that HF itself ignores on load.
_ALIASES_OF_SHARED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)

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


def mapping(config: T5Config) -> list[tuple[str, tuple[str, ...], bool]]:
    """Every HF tensor of ``config``'s model: ``(hf_name, llmjax path, transpose)``."""
    mlp = ("wi_0", "wi_1", "wo") if config.gated else ("wi", "wo")
    rows = list(_MODEL) + ([] if config.tie_word_embeddings else list(_UNTIED_HEAD))
    for table, layers in ((_ENCODER_LAYER, config.num_layers), (_DECODER_LAYER, config.decoder_layers)):
        for i in range(layers):
            for hf, path, transpose in table:
                projections = (mlp if "mlp" in path else _ATTENTION_PROJECTIONS) if "{p}" in hf else ("",)
                rows += [(hf.format(i=i, p=p), path.format(i=i, p=p), transpose) for p in projections]
    return [(hf, tuple(path.split("/")), transpose) for hf, path, transpose in rows]


def _llmjax_shapes(config: T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Parameter shapes the model builds for ``config`` (traced, nothing computed)."""
    model = build_model(config)
    abstract = jax.eval_shape(lambda r: model.init(r, *dummy_inputs(config)), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract["params"]))[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


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


# ----------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------

def _hf_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
    return tuple(reversed(shape)) if transpose else tuple(shape)


def params_from_hf(tensors: dict[str, np.ndarray], config: T5Config) -> dict:
    """HF tensors (name -> array) -> llmjax params (nested dict of numpy arrays, HF dtype)."""
    tensors = dict(tensors)
    rows = mapping(config)
    shapes = _llmjax_shapes(config)
    if not config.tie_word_embeddings and "lm_head.weight" not in tensors and "shared.weight" in tensors:
        # transformers >= 5 ties T5 heads when their values are equal and then saves only shared.weight.
        tensors["lm_head.weight"] = tensors["shared.weight"]
    _check_tied_head(tensors, config)
    missing = [hf for hf, _, _ in rows if hf not in tensors]
    known = {hf for hf, _, _ in rows} | set(_ALIASES_OF_SHARED) | set(_IGNORED)
    if config.tie_word_embeddings:
        known.add("lm_head.weight")
    unexpected = sorted(set(tensors) - known)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match config.json: missing tensors {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}; check num_layers/num_decoder_layers/"
            "feed_forward_proj/tie_word_embeddings in config.json"
        )
    params: dict = {}
    for hf, path, transpose in rows:
        value = tensors[hf]
        expected = _hf_shape(shapes[path], transpose)
        if tuple(value.shape) != expected:
            raise CheckpointError(
                f"tensor {hf!r}: expected shape {expected} (llmjax {'/'.join(path)}), found {tuple(value.shape)}; "
                "config.json does not match the weights"
            )
        _set(params, path, value.T if transpose else value)
    return params


def _check_tied_head(tensors: dict[str, np.ndarray], config: T5Config) -> None:
    if not config.tie_word_embeddings or "lm_head.weight" not in tensors or "shared.weight" not in tensors:
        return
    head, shared = tensors["lm_head.weight"], tensors["shared.weight"]
    if head.shape != shared.shape or not np.array_equal(head, shared):
        raise CheckpointError(
            "lm_head.weight differs from shared.weight but config.json asks for the tied v1.0 head "
            "(scale_decoder_outputs/tie_word_embeddings true); llmjax cannot run a scaled untied head. "
            "Set tie_word_embeddings and scale_decoder_outputs to false if this is a v1.1/FLAN model"
        )


def params_to_hf(params: dict, config: T5Config) -> dict[str, np.ndarray]:
    """llmjax params (nested dict of arrays) -> HF tensors (name -> contiguous numpy array)."""
    shapes = _llmjax_shapes(config)
    rows = mapping(config)
    mapped = {path for _, path, _ in rows}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    unmapped = sorted("/".join(k.key for k in path) for path, _ in flat if tuple(k.key for k in path) not in mapped)
    if unmapped:
        raise CheckpointError(
            f"params {unmapped[:8]} have no Hugging Face T5 name; merge or drop them (e.g. LoRA adapters) "
            "before exporting"
        )
    tensors = {}
    for hf, path, transpose in rows:
        try:
            value = _get(params, path)
        except KeyError:
            raise CheckpointError(f"params have no {'/'.join(path)} (needed for {hf!r})") from None
        if tuple(value.shape) != shapes[path]:
            raise CheckpointError(
                f"param {'/'.join(path)}: expected shape {shapes[path]} for this config, found {tuple(value.shape)}"
            )
        value = np.asarray(value)
        tensors[hf] = np.ascontiguousarray(value.T if transpose else value)
    return tensors


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
