"""int8 post-training quantization of a whole model: quantize, dequantize, save, load, count bytes.

``quantize(model, params)`` -> ``(qmodel, qparams)``: the same family of model with
``config.quantization`` set (``llmjax.model_config.QUANTIZATIONS``) and params in which every dense
kernel (attention q/k/v/o, cross-attention, feed-forward, untied LM head) is int8 ``[..., in, out]``
beside an fp32 ``kernel_scale [..., out]`` (symmetric, one scale per output channel), and the token
embedding is int8 ``[vocab, embed]`` beside ``embedding_scale [vocab]`` (one per row: per output
channel of a tied LM head, and the row a lookup rescales). Norm scales and T5's relative-position
tables stay float: they are a few thousand numbers and feed every position. Which leaves are int8 is
read off the quantized model's own ``init`` (its int8 params), so the model code is the one place that
says it. The same ``model.apply`` and ``llmjax.generate.generate`` run the quantized pair.

Embeddings are quantized too: for T5-small (tied head) the embedding is 45% of the weights one
decoding step reads, so leaving it float would cap the saving well under 4x.

A quantized model directory (``save`` / ``load``; ``llmjax.loading.load_model`` reads it, so
``llmjax generate --model DIR`` and ``llmjax evaluate`` take it)::

    llmjax_quantized.json      {"format": FORMAT, "family": ..., "model_config": {... "quantization": ...}}
    quantized.safetensors      every leaf, named by its "/"-joined path (int8 kernels, fp32 scales, norms)
    spiece.model, ...          the tokenizer, when the source model had one
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from llmjax.errors import UserError
from llmjax.hf.io import load_safetensors
from llmjax.model_config import MODEL_CONFIGS, QUANTIZATIONS, family_of
from llmjax.models import build_model, dummy_inputs
from llmjax.models.int8 import dequantize_channels, quantize_channels

FORMAT = "llmjax-int8-v1"
CONFIG_NAME = "llmjax_quantized.json"
WEIGHTS_NAME = "quantized.safetensors"
DEFAULT_QUANTIZATION = "int8_dynamic"  # the faster form on CPU (benchmarks/results/quantize_cpu.txt)
# Where the scale of each int8 leaf lives, and the axis a scale spans (the one its max is taken over).
SCALES = {"kernel": ("kernel_scale", -2), "embedding": ("embedding_scale", -1)}


class QuantizeError(UserError, ValueError):
    """A model or directory that cannot be quantized, saved or read as a quantized model."""


def is_quantized(model) -> bool:
    return model.config.quantization is not None


def _abstract_params(model) -> dict:
    shapes = jax.eval_shape(lambda k: model.init(k, *dummy_inputs(model.config)), jax.random.key(0))["params"]
    return jax.tree_util.tree_map(lambda box: box.value if isinstance(box, nn.Partitioned) else box, shapes,
                                  is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _int8_sites(qmodel, prefix=(), tree=None) -> list[tuple[tuple[str, ...], str]]:
    """``(module path, leaf name)`` of every int8 leaf of ``qmodel``'s params (``kernel`` / ``embedding``)."""
    tree = _abstract_params(qmodel) if tree is None else tree
    found = []
    for key, value in tree.items():
        if isinstance(value, dict):
            found += _int8_sites(qmodel, prefix + (key,), value)
        elif value.dtype == jnp.int8:
            found.append((prefix, key))
    return found


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _with(tree: dict, path, leaves: dict) -> dict:
    """A copy of ``tree`` with the module dict at ``path`` updated by ``leaves`` (other subtrees shared)."""
    if not path:
        return {**tree, **leaves}
    return {**tree, path[0]: _with(tree[path[0]], path[1:], leaves)}


def quantized_model(model, quantization: str = DEFAULT_QUANTIZATION):
    """The same model storing int8 weights (``config.quantization`` set); see :func:`quantize`."""
    if is_quantized(model):
        raise QuantizeError(f"the model is already quantized ({model.config.quantization}); quantize its float "
                            "source instead, or use it as it is")
    if quantization not in QUANTIZATIONS:
        raise QuantizeError(f"quantization={quantization!r} is unknown; use one of {list(QUANTIZATIONS)}")
    return build_model(dataclasses.replace(model.config, quantization=quantization))


def quantize(model, params: dict, quantization: str = DEFAULT_QUANTIZATION) -> tuple[object, dict]:
    """``(model, float params)`` -> ``(quantized model, params with int8 kernels and embeddings)``.

    ``quantization``: ``"int8_dynamic"`` (int8 activations too, the faster form on CPU) or ``"int8"``
    (weight-only, activations in the compute dtype); both store the same weights. Pure and jittable in
    ``params`` (jnp arrays out). The params must be the model's own (``[..., in, out]`` kernels, scanned or
    not as ``model.config.scan_layers`` says), plain arrays or ``nn.Partitioned`` boxes as ``model.init``
    makes them: a boxed kernel gives a boxed int8 kernel and a scale boxed with the kernel's output axes,
    so they shard like the kernel.
    """
    qmodel = quantized_model(model, quantization)
    out = params
    for path, name in _int8_sites(qmodel):
        scale_name, axis = SCALES[name]
        leaf = _get(params, path + (name,))
        if isinstance(leaf, nn.Partitioned):
            q, scale = quantize_channels(leaf.value, axis)
            dropped = len(leaf.names) + axis
            q = leaf.replace(value=q)
            scale = leaf.replace(value=scale, names=tuple(n for i, n in enumerate(leaf.names) if i != dropped))
        else:
            q, scale = quantize_channels(leaf, axis)
        out = _with(out, path, {name: q, scale_name: scale})
    return qmodel, out


def dequantize(qmodel, qparams: dict) -> tuple[object, dict]:
    """The inverse of :func:`quantize` up to rounding: ``(float model, params)`` in the model's ``param_dtype``,
    each int8 leaf replaced by ``q * scale`` and its scale dropped."""
    if not is_quantized(qmodel):
        raise QuantizeError("the model is not quantized; there is nothing to dequantize")
    model = build_model(dataclasses.replace(qmodel.config, quantization=None))
    dtype = jnp.dtype(model.config.param_dtype)
    out = qparams
    for path, name in _int8_sites(qmodel):
        scale_name, axis = SCALES[name]
        module = _get(qparams, path)
        weights = dequantize_channels(module[name], module[scale_name], axis, dtype)
        out = _with(out, path, {name: weights})
        del _get(out, path)[scale_name]  # _with made that dict fresh: the caller's tree is untouched
    return model, out


def rounded(model, params: dict) -> dict:
    """``params`` (plain arrays) as the int8 model holds them, back in float; pure and jittable."""
    qmodel, qparams = quantize(model, params, "int8")
    return dequantize(qmodel, qparams)[1]


def round_trip(model, params: dict) -> dict:
    """:func:`rounded` as host numpy: what LoRA adapters trained on the int8 base (QLoRA) are merged into."""
    return jax.tree_util.tree_map(np.asarray, rounded(model, params))


# -- bytes ---------------------------------------------------------------------------------------------

def param_bytes(params) -> int:
    """Bytes the arrays of a param tree occupy in memory (``size * itemsize`` summed)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params))


def directory_bytes(path: str | Path) -> int:
    """Bytes of the weight files of a model directory on disk (``*.safetensors``, tokenizer not counted)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors") if p.is_file())


def footprint(params, directory: str | Path | None = None) -> dict:
    """``{"memory_bytes": param_bytes(params), "disk_bytes": directory_bytes(directory) or None}``."""
    return {"memory_bytes": param_bytes(params),
            "disk_bytes": None if directory is None else directory_bytes(directory)}


# -- directories ---------------------------------------------------------------------------------------

def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = np.ascontiguousarray(np.asarray(value))
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def save(qmodel, qparams: dict, directory: str | Path, tokenizer_files=()) -> Path:
    """Write a quantized model directory (module docstring); ``tokenizer_files``: paths copied in beside it."""
    if not is_quantized(qmodel):
        raise QuantizeError("save() writes quantized models; quantize() the model first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(_flatten(jax.device_get(qparams)), str(directory / WEIGHTS_NAME),
                                metadata={"format": FORMAT})
    for file in tokenizer_files:
        shutil.copyfile(file, directory / Path(file).name)
    meta = {"format": FORMAT, "family": family_of(qmodel.config), "model_config": dataclasses.asdict(qmodel.config)}
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")  # last: marks it whole
    return directory


def read_config(directory: str | Path):
    """The model config (``quantization`` set) of a directory :func:`save` wrote, without reading a weight."""
    directory = Path(directory)
    if not is_quantized_dir(directory):
        raise QuantizeError(f"{directory} is not a quantized model directory (no {CONFIG_NAME}); write one with "
                            "`llmjax quantize --model DIR --out DIR`")
    try:
        meta = json.loads((directory / CONFIG_NAME).read_text())
        config = MODEL_CONFIGS[meta["family"]](**meta["model_config"])
    except (ValueError, KeyError, TypeError) as e:
        raise QuantizeError(f"{directory / CONFIG_NAME} is unreadable or names an unusable model ({e!r}); "
                            "quantize the model again") from None
    if meta.get("format") != FORMAT or config.quantization is None:
        raise QuantizeError(f"{directory / CONFIG_NAME}: format {meta.get('format')!r} with quantization "
                            f"{config.quantization!r}; this llmjax reads {FORMAT!r}: quantize the model again")
    return config


def load(directory: str | Path) -> tuple[object, dict]:
    """``(quantized model, params as host numpy arrays)`` of a directory :func:`save` wrote."""
    directory = Path(directory)
    config = read_config(directory)
    if not (directory / WEIGHTS_NAME).is_file():
        raise QuantizeError(f"{directory / WEIGHTS_NAME} is missing; quantize the model again")
    params = _unflatten({k: np.asarray(v) for k, v in load_safetensors(directory / WEIGHTS_NAME).items()})
    model = build_model(config)
    expected = {"/".join(map(str, (k.key for k in p))): (tuple(x.shape), x.dtype)
                for p, x in jax.tree_util.tree_leaves_with_path(_abstract_params(model))}
    given = {name: (tuple(x.shape), x.dtype) for name, x in _flatten(params).items()}
    if expected != given:
        wrong = sorted(k for k in set(expected) | set(given) if expected.get(k) != given.get(k))
        raise QuantizeError(f"{directory / WEIGHTS_NAME} does not fit its config: {wrong[:5]} differ in name, "
                            "shape or dtype; quantize the model again")
    return model, params
