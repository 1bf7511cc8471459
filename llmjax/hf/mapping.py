"""The Hugging Face mapping engine: one algorithm for every family's weight-name table.

A family module (``llmjax.hf.t5``, ``llmjax.hf.llama``) states its table as data, rows of
``(HF tensor name, llmjax param path, transpose)`` whose strings may hold placeholders (``{i}`` the
layer index, ``{p}`` a projection), and builds a :class:`WeightMap` for a model config with
:func:`expand`. Everything else happens here, the same way for every family:

- :func:`import_tensors`: HF tensors -> llmjax params. Missing and unexpected names are listed
  together, a tied copy must equal its source, and every tensor's shape is checked against the
  shape the model builds, with an error naming the tensor.
- :func:`export_params`: llmjax params -> HF tensors, refusing params that have no HF name.
- :meth:`WeightMap.hf_name` / :meth:`WeightMap.hf_module` / :meth:`WeightMap.path`: the lookup in
  both directions. A LoRA adapter of the kernel at ``path`` lives in PEFT's format under
  ``base_model.model.{hf_module(path)}.lora_A.weight`` (and ``lora_B``), transposed like the kernel
  (``WeightMap.row(path).transpose``).

Paths are tuples of keys of the *unscanned* param tree (``layers_0``, ``layers_1``, ...): with
``scan_layers`` the caller unstacks before and stacks after (``llmjax.hf`` does so at its boundary).

HF ``nn.Linear`` stores ``weight [out, in]`` and llmjax ``Dense`` stores ``kernel [in, out]``, so
projection rows say ``transpose``; embeddings and norms keep their layout.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
import string
import types
from collections.abc import Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from llmjax.hf.io import CheckpointError
from llmjax.models import build_model, dummy_inputs

ParamPath = tuple[str, ...]  # keys from the root of the params tree to one array
TableRow = tuple[str, str, bool]  # (HF name pattern, "a/b/{i}/c" llmjax path pattern, transpose)
_SHOWN = 8  # names listed in one error message


@dataclasses.dataclass(frozen=True)
class Row:
    """One HF tensor and the llmjax param it holds; ``transpose`` swaps the two axes of a matrix."""

    hf_name: str
    path: ParamPath
    transpose: bool

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF shape of a param whose llmjax shape is ``shape``."""
        return tuple(reversed(shape)) if self.transpose else tuple(shape)


def _placeholders(pattern: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(pattern) if field}


def expand(table: Iterable[TableRow], **values: Iterable) -> list[Row]:
    """Table rows with each placeholder filled by each of its ``values`` (all combinations).

    ``expand([("h.{i}.{p}.weight", "layers_{i}/{p}/kernel", True)], i=range(2), p=("q", "k"))`` gives
    four rows; a row without placeholders is kept once. A row whose HF name and path hold different
    placeholders is a bug in the table.
    """
    rows = []
    for hf_pattern, path_pattern, transpose in table:
        names = sorted(_placeholders(hf_pattern))
        if set(names) != _placeholders(path_pattern):
            raise ValueError(f"table row {hf_pattern!r} -> {path_pattern!r}: placeholders differ")
        for combination in itertools.product(*(tuple(values[name]) for name in names)):
            fill = dict(zip(names, combination))
            rows.append(Row(hf_pattern.format(**fill), tuple(path_pattern.format(**fill).split("/")), transpose))
    return rows


@functools.lru_cache(maxsize=32)
def param_shapes(config) -> Mapping[ParamPath, tuple[int, ...]]:
    """Every param path of the unscanned model ``config`` builds -> its shape (traced, nothing computed)."""
    if getattr(config, "scan_layers", False):  # the tables describe the unscanned tree
        config = dataclasses.replace(config, scan_layers=False)
    model = build_model(config)
    abstract = jax.eval_shape(lambda rng: model.init(rng, *dummy_inputs(config)), jax.random.key(0))
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract["params"]))
    return types.MappingProxyType({path: tuple(leaf.shape) for path, leaf in flat.items()})  # cached: read-only


@dataclasses.dataclass(frozen=True)
class WeightMap:
    """The expanded table of one model config and what the engine needs to check a checkpoint against it.

    family: the family's name in messages ("T5", "llama").
    rows: one per llmjax param; together they cover every param of the model exactly.
    shapes: llmjax path -> shape, as :func:`param_shapes` returns.
    tied: HF name -> the mapped HF name it duplicates (a tied head). A file may carry the copy; it
      must then equal its source. Export does not write it.
    fallback: mapped HF name -> HF name read in its place when the file lacks it.
    ignored: a regular expression of HF names accepted and dropped (buffers, aliases HF never reads).
    aliases: HF module -> the mapped HF module whose weights it reads under a second name (T5's
      ``encoder.embed_tokens`` is ``shared``); besides ``tied``, which names tensors.
    config_keys: the config.json keys that decide which tensors exist, named when the names differ.
    tied_fix: what to change when a tied copy differs from its source.
    """

    family: str
    rows: tuple[Row, ...]
    shapes: Mapping[ParamPath, tuple[int, ...]]
    tied: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fallback: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ignored: str = "(?!)"  # matches nothing
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    config_keys: tuple[str, ...] = ()
    tied_fix: str = "set tie_word_embeddings=false in config.json"

    def __post_init__(self):
        # A mismatch here is a bug in the family's table, not in the user's files.
        if len(self._by_path) != len(self.rows) or len(self._by_name) != len(self.rows):
            raise AssertionError(f"{self.family} mapping table names a param or a tensor twice")
        unmatched = sorted("/".join(path) for path in set(self._by_path) ^ set(self.shapes))
        if unmatched:
            raise AssertionError(f"{self.family} mapping table and model params differ: {unmatched}")

    @functools.cached_property
    def _by_path(self) -> dict[ParamPath, Row]:
        return {row.path: row for row in self.rows}

    @functools.cached_property
    def _by_name(self) -> dict[str, Row]:
        return {row.hf_name: row for row in self.rows}

    def row(self, path: ParamPath) -> Row:
        """The row of the llmjax param at ``path`` (a tuple of keys); KeyError if it has no HF name."""
        try:
            return self._by_path[tuple(path)]
        except KeyError:
            raise KeyError(f"llmjax param {'/'.join(path)} has no Hugging Face {self.family} name") from None

    def hf_name(self, path: ParamPath) -> str:
        """``("layers_0", "self_attention", "q", "kernel")`` -> ``"model.layers.0.self_attn.q_proj.weight"``."""
        return self.row(path).hf_name

    def hf_module(self, path: ParamPath) -> str:
        """The HF module holding the param at ``path``: its tensor name without ``.weight``.

        This is the name PEFT uses: ``base_model.model.<hf_module>.lora_A.weight``; its last
        component (``q_proj``, ``wi_0``) is what ``target_modules`` lists.
        """
        return self.hf_name(path).rsplit(".", 1)[0]

    def path(self, hf_name: str) -> ParamPath:
        """The llmjax path of the HF tensor ``hf_name``; KeyError if the table has no such tensor."""
        try:
            return self._by_name[hf_name].path
        except KeyError:
            raise KeyError(f"{hf_name!r} is not a Hugging Face {self.family} tensor of this config") from None


def _listed(names: list[str]) -> str:
    return f"{names[:_SHOWN]}{' ...' if len(names) > _SHOWN else ''}"


def tensor_mismatch(missing: list[str], unexpected: list[str]) -> str:
    """``missing tensors [...], unexpected tensors [...]`` for an error message: the first names of each
    non-empty list."""
    return ", ".join(f"{what} tensors {_listed(names)}"
                     for what, names in (("missing", missing), ("unexpected", unexpected)) if names)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


def import_tensors(tensors: Mapping[str, np.ndarray], weights: WeightMap) -> dict:
    """HF tensors (name -> array, ``[out, in]`` for projections) -> llmjax params (nested dict).

    Values keep their dtype and are views of ``tensors`` (a transpose is a view too), so memory-mapped
    files stay mapped until the caller casts them. Raises :class:`CheckpointError` naming every missing
    and unexpected tensor, a tied copy that differs, or the first tensor with the wrong shape.
    """
    tensors = dict(tensors)
    for name, source in weights.fallback.items():
        if name not in tensors and source in tensors:
            tensors[name] = tensors[source]
    expected = {row.hf_name for row in weights.rows}
    ignored = re.compile(weights.ignored)
    missing = sorted(expected - set(tensors))
    unexpected = sorted(name for name in tensors
                        if name not in expected and name not in weights.tied and not ignored.fullmatch(name))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights.family} checkpoint does not match config.json: {tensor_mismatch(missing, unexpected)}; are "
            f"{'/'.join(weights.config_keys)} in config.json the ones these weights were saved with?"
        )
    for name, source in weights.tied.items():
        if name in tensors and not _same(np.asarray(tensors[name]), np.asarray(tensors[source])):
            raise CheckpointError(f"{name} differs from {source}, but config.json ties them; {weights.tied_fix}")
    flat = {}
    for row in weights.rows:
        value = tensors[row.hf_name]
        want = row.hf_shape(weights.shapes[row.path])
        if tuple(value.shape) != want:
            raise CheckpointError(
                f"tensor {row.hf_name!r}: expected shape {want} (llmjax {'/'.join(row.path)}), found "
                f"{tuple(value.shape)}; config.json does not match the weights"
            )
        flat[row.path] = value.T if row.transpose else value
    return traverse_util.unflatten_dict(flat)


def export_params(params: Mapping, weights: WeightMap) -> dict[str, np.ndarray]:
    """llmjax params (nested dict of arrays) -> HF tensors (name -> C-contiguous numpy array, same dtype).

    Raises :class:`CheckpointError` for params without an HF name (adapters, heads: merge or drop them
    first), for missing params, and for a param whose shape the config does not give.
    """
    flat = traverse_util.flatten_dict(params)
    unmapped = sorted("/".join(path) for path in flat if path not in weights.shapes)
    if unmapped:
        raise CheckpointError(
            f"params {_listed(unmapped)} have no Hugging Face {weights.family} name; merge or drop them "
            "(e.g. LoRA adapters, value heads) before exporting"
        )
    tensors = {}
    for row in weights.rows:
        if row.path not in flat:
            raise CheckpointError(f"params have no {'/'.join(row.path)} (needed for {row.hf_name!r})")
        value = np.asarray(flat[row.path])
        if value.shape != weights.shapes[row.path]:
            raise CheckpointError(
                f"param {'/'.join(row.path)}: expected shape {weights.shapes[row.path]} for this config, "
                f"found {value.shape}"
            )
        tensors[row.hf_name] = np.ascontiguousarray(value.T if row.transpose else value)
    return tensors
