"""Import and export of Hugging Face checkpoints, one mapping module per family.

A family module (``llmjax.hf.t5``, ``llmjax.hf.llama``) provides:
  ``MODEL_TYPES``         the ``model_type`` values of config.json it reads
  ``CONFIG_CLASS``        the llmjax model-config dataclass it produces
  ``config_from_hf(d)``   HF config dict -> llmjax config (clear error if unsupported)
  ``config_to_hf(c)``     llmjax config -> HF config dict
  ``build_model(c)``      llmjax config -> flax module
  ``weight_map(c)``       llmjax config -> :class:`llmjax.hf.mapping.WeightMap`, the family's table
                          expanded for ``c``; the engine in :mod:`llmjax.hf.mapping` applies it
  ``generation_config_to_hf(c)``  optional: dict written as ``generation_config.json``
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from types import ModuleType

import jax
import numpy as np

from llmjax.hf.io import CheckpointError, read_config, read_tensors, write_model_dir
from llmjax.hf.mapping import WeightMap, export_params, import_tensors
from llmjax.models.scan import stack_layers, unstack_layers

FAMILY_MODULES = ("llmjax.hf.t5", "llmjax.hf.llama")


def _families() -> list[ModuleType]:
    return [importlib.import_module(name) for name in FAMILY_MODULES]


def family_for_model_type(model_type: str | None) -> ModuleType:
    for family in _families():
        if model_type in family.MODEL_TYPES:
            return family
    known = sorted(t for f in _families() for t in f.MODEL_TYPES)
    raise CheckpointError(
        f"config.json has model_type={model_type!r}, which llmjax does not support; supported: {known}"
    )


def family_for_config(config) -> ModuleType:
    for family in _families():
        if isinstance(config, family.CONFIG_CLASS):
            return family
    raise TypeError(f"no Hugging Face mapping for model config of type {type(config).__name__}")


def weight_map(config) -> WeightMap:
    """The HF name of every param of the (unscanned) model ``config`` builds, and the reverse."""
    return family_for_config(config).weight_map(config)


def params_from_hf(tensors: dict[str, np.ndarray], config) -> dict:
    """HF tensors (name -> array) -> llmjax params in ``config``'s layout (nested dict, the tensors' dtype).

    The mapping speaks the unscanned tree (``layers_0``, ``layers_1``, ...); with ``config.scan_layers``
    the layers are then stacked (``llmjax.models.stack_layers``).
    """
    params = import_tensors(tensors, weight_map(config))
    return stack_layers(params, config) if config.scan_layers else params


def params_to_hf(params: dict, config) -> dict[str, np.ndarray]:
    """llmjax params in ``config``'s layout (nested dict of host arrays) -> HF tensors (name -> numpy array)."""
    if config.scan_layers:
        params = unstack_layers(params, config)
    return export_params(params, weight_map(config))


def from_pretrained(path: str | Path, **config_overrides):
    """Read a local Hugging Face directory -> ``(model, params)``; params are fp32 numpy-backed jax arrays.

    ``config_overrides`` replace fields of the llmjax config (e.g. ``dtype="bfloat16"``).
    """
    hf_config = read_config(path)
    family = family_for_model_type(hf_config.get("model_type"))
    config = family.config_from_hf(hf_config)
    if config_overrides:
        valid = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(config_overrides) - valid)
        if unknown:
            raise ValueError(
                f"from_pretrained: {unknown} are not fields of {type(config).__name__}; valid: {sorted(valid)}"
            )
        config = dataclasses.replace(config, **config_overrides)
    tensors = read_tensors(path)
    params = params_from_hf(tensors, config)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.dtype(config.param_dtype)), params)
    return family.build_model(config), params


def save_pretrained(model, params, path: str | Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads with the same logits."""
    family = family_for_config(model.config)
    host_params = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), params)
    tensors = params_to_hf(host_params, model.config)
    write_model_dir(path, family.config_to_hf(model.config), tensors)
    if hasattr(family, "generation_config_to_hf"):
        generation = family.generation_config_to_hf(model.config)
        (Path(path) / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")


__all__ = [
    "CheckpointError", "from_pretrained", "save_pretrained", "family_for_model_type", "weight_map",
    "params_from_hf", "params_to_hf",
]
