"""Model families (records in ``llmjax.models.family``): build a module from its config, init its params."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from llmjax.model_config import MODEL_CONFIGS, DecoderConfig, T5Config, family_of  # noqa: F401 (re-exported)
from llmjax.models.family import FAMILIES, Family, model_family, step_flops  # noqa: F401 (re-exported)
from llmjax.models.scan import cache_batch_axis, stack_layers, to_layout, unstack_layers  # noqa: F401 (re-exported)


def build_model(config) -> nn.Module:
    """Model config dataclass -> flax module (``T5`` or ``Decoder``)."""
    return model_family(config).module()(config)


def dummy_inputs(config, batch: int = 1, length: int = 8) -> tuple[jax.Array, ...]:
    """Positional arguments that ``model.init`` needs to build every parameter."""
    return model_family(config).dummy_inputs(batch, length)


def init_params(model: nn.Module, rng: jax.Array) -> dict:
    """Random parameters as a plain nested dict (logical-axis boxes removed)."""
    # Jitted: eager init dispatches one small op at a time and is many times slower.
    init = jax.jit(lambda r: model.init(r, *dummy_inputs(model.config))["params"])
    return nn.meta.unbox(init(rng))


def logical_axes(model: nn.Module) -> dict:
    """The logical axis names of every parameter (same tree as the params), without computing them."""
    abstract = jax.eval_shape(lambda r: model.init(r, *dummy_inputs(model.config)), jax.random.key(0))
    return nn.get_partition_spec(abstract["params"])


def replace_config(model: nn.Module, **changes) -> nn.Module:
    """The same family of module with some config fields changed (e.g. ``dtype="bfloat16"``)."""
    return build_model(dataclasses.replace(model.config, **changes))
