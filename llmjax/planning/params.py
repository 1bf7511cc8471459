"""Every parameter of a model, listed from its config alone: path, shape, logical axes.

The list mirrors the trees ``llmjax/models/t5.py`` and ``llmjax/models/decoder.py`` build (a test
compares it leaf by leaf with ``jax.eval_shape(model.init)``), so parameter counts are exact and the
bytes a device holds follow from the logical axes through the one rules table in ``llmjax.axes``,
with no model built and nothing allocated.
"""

from __future__ import annotations

import dataclasses
import math

from llmjax import axes
from llmjax.errors import UserError
from llmjax.model_config import DecoderConfig, T5Config, family_of

MESH_AXES = axes.MESH_AXES  # ("data", "fsdp", "tensor")


class PlanError(UserError, ValueError):
    """A planning input (mesh, batch, precision, ...) that cannot describe a run."""


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter leaf: ``path`` as the params tree nests it, its shape and logical axis names."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    names: tuple[str | None, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def is_matrix(self) -> bool:
        """A kernel or embedding table (what weight-only int8 quantizes); norms and tables of biases are not."""
        return self.path[-1] in ("kernel", "embedding")

    def shard_shape(self, mesh: dict[str, int]) -> tuple[int, ...]:
        """The per-device block under ``mesh`` (``{"data": d, "fsdp": f, "tensor": t}``).

        Raises :class:`PlanError` where a dimension does not divide, as building the run would
        (``llmjax.sharding``).
        """
        out = []
        for dim, (size, name) in enumerate(zip(self.shape, self.names)):
            parts = math.prod(mesh[a] for a in mesh_axes_of(name))
            if size % parts:
                raise PlanError(f"{'/'.join(self.path)}: dimension {dim} (logical axis {name!r}) of size {size} "
                                f"does not split into {parts} shards over {mesh_axes_of(name)}; change the mesh")
            out.append(size // parts)
        return tuple(out)


def mesh_axes_of(logical_name: str | None) -> tuple[str, ...]:
    """The mesh axes a logical axis name is split over (``axes.LOGICAL_AXIS_RULES``, first match wins)."""
    if logical_name is None:
        return ()
    for name, mesh_axis in axes.LOGICAL_AXIS_RULES:
        if name == logical_name:
            if mesh_axis is None:
                return ()
            return tuple(mesh_axis) if isinstance(mesh_axis, (tuple, list)) else (mesh_axis,)
    return ()


def _dense(path, fan_in: int, fan_out: int, in_axis: str, out_axis: str) -> list[ParamSpec]:
    return [ParamSpec((*path, "kernel"), (fan_in, fan_out), (in_axis, out_axis))]


def _norm(path, width: int) -> list[ParamSpec]:
    return [ParamSpec((*path, "scale"), (width,), (axes.NORM,))]


def _attention(path, width: int, q_width: int, kv_width: int) -> list[ParamSpec]:
    return (_dense((*path, "q"), width, q_width, axes.EMBED, axes.HEADS)
            + _dense((*path, "k"), width, kv_width, axes.EMBED, axes.KV_HEADS)
            + _dense((*path, "v"), width, kv_width, axes.EMBED, axes.KV_HEADS)
            + _dense((*path, "o"), q_width, width, axes.HEADS, axes.EMBED))


def _mlp(path, width: int, hidden: int, gated: bool) -> list[ParamSpec]:
    inputs = ("wi_0", "wi_1") if gated else ("wi",)
    specs = [s for name in inputs for s in _dense((*path, name), width, hidden, axes.EMBED, axes.MLP)]
    return specs + _dense((*path, "wo"), hidden, width, axes.MLP, axes.EMBED)


def _stack(prefix: tuple[str, ...], layer: list[ParamSpec], count: int, scanned: bool) -> list[ParamSpec]:
    """A layer's leaves repeated ``count`` times: one stacked ``layers`` entry, or ``layers_{i}`` entries."""
    if scanned:
        return [ParamSpec((*prefix, "layers", *s.path), (count, *s.shape), (axes.LAYERS, *s.names)) for s in layer]
    return [ParamSpec((*prefix, f"layers_{i}", *s.path), s.shape, s.names) for i in range(count) for s in layer]


def _t5_specs(c: T5Config) -> list[ParamSpec]:
    d, inner = c.d_model, c.num_heads * c.d_kv
    specs = [ParamSpec(("shared", "embedding"), (c.vocab_size, d), (axes.VOCAB, axes.EMBED))]
    for stack, count, is_decoder in (("encoder", c.num_layers, False), ("decoder", c.decoder_layers, True)):
        layer = _norm(("self_attention_norm",), d) + _attention(("self_attention",), d, inner, inner)
        if is_decoder:
            layer += _norm(("cross_attention_norm",), d) + _attention(("cross_attention",), d, inner, inner)
        layer += _norm(("mlp_norm",), d) + _mlp(("mlp",), d, c.d_ff, c.gated)
        specs += [ParamSpec((stack, "relative_position_bias", "rel_embedding"),
                            (c.relative_attention_num_buckets, c.num_heads), (axes.RELPOS, None))]
        specs += _stack((stack,), layer, count, c.scan_layers) + _norm((stack, "final_norm"), d)
    if not c.tie_word_embeddings:
        specs += _dense(("lm_head",), d, c.vocab_size, axes.EMBED, axes.VOCAB)
    return specs


def _decoder_specs(c: DecoderConfig) -> list[ParamSpec]:
    h = c.hidden_size
    layer = (_norm(("pre_attention_norm",), h)
             + _attention(("self_attention",), h, c.num_attention_heads * c.dim_per_head, c.kv_heads * c.dim_per_head)
             + _norm(("pre_mlp_norm",), h) + _mlp(("mlp",), h, c.intermediate_size, gated=True))
    specs = [ParamSpec(("embed", "embedding"), (c.vocab_size, h), (axes.VOCAB, axes.EMBED))]
    specs += _stack((), layer, c.num_hidden_layers, c.scan_layers) + _norm(("final_norm",), h)
    if not c.tie_word_embeddings:
        specs += _dense(("lm_head",), h, c.vocab_size, axes.EMBED, axes.VOCAB)
    return specs


SPEC_BUILDERS = {"t5": _t5_specs, "decoder": _decoder_specs}


def param_specs(config) -> list[ParamSpec]:
    """Every parameter leaf of the model ``config`` builds (``T5Config`` or ``DecoderConfig``)."""
    return SPEC_BUILDERS[family_of(config)](config)


def count_params(config) -> int:
    """Exact number of parameters (scalars) of ``config``'s model."""
    return sum(spec.size for spec in param_specs(config))


def check_mesh(mesh: dict[str, int]) -> dict[str, int]:
    """``{"data": d, "fsdp": f, "tensor": t}`` with every axis present and a positive int."""
    unknown = sorted(set(mesh) - set(MESH_AXES))
    if unknown:
        raise PlanError(f"unknown mesh axes {unknown}; the mesh axes are {list(MESH_AXES)}")
    full = {name: mesh.get(name, 1) for name in MESH_AXES}
    bad = {k: v for k, v in full.items() if not isinstance(v, int) or v < 1}
    if bad:
        raise PlanError(f"mesh sizes must be positive integers (no -1: planning has no devices to fill it from), "
                        f"got {bad}")
    return full
