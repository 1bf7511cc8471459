"""LoRA as parameter-pytree surgery: the config, where adapters go, their init, merge and unmerge.

The base model's code is untouched. Adapters are a separate nested dict with the same nesting as the
params down to each targeted ``Dense`` module, whose ``kernel`` ``[in, out]`` (``[L, in, out]`` in a
scanned stack) is shadowed by ``lora_A [in, r]`` and ``lora_B [r, out]`` (``[L, in, r]`` / ``[L, r, out]``),
both fp32. The adapted kernel is ``kernel + scale * A @ B`` with ``scale = lora_alpha / r`` (``lora_alpha /
sqrt(r)`` with ``use_rslora``). With ``use_dora`` (DoRA) the module also holds ``lora_magnitude_vector [out]``
(``[L, out]``), ``m``, and the adapted kernel is ``(kernel + scale * A @ B) * m / ||kernel + scale * A @ B||``,
the norm taken over the input axis for each output channel (PEFT's DoRA; :func:`dora_factor`). With
``init_lora_weights="pissa"`` (PiSSA) the module also holds the frozen ``lora_A_init`` / ``lora_B_init`` (A0, B0, the
kernel's principal part, :func:`pissa_factors`) and the update is ``scale * (A @ B - A0 @ B0)``. With
``modules_to_save`` the adapters also hold a trained fp32 copy of each weight of those modules, at the weight's own
path (``.../self_attention_norm/scale``, ``lm_head/kernel``), which replaces the base's (:func:`saved_leaves`). With
``trainable_token_indices`` they hold ``trainable_tokens_delta [n, d_model]`` beside the input embedding
(``embed/trainable_tokens_delta``): the trained rows of those tokens, which replace the base's rows (PEFT's name,
though the rows are the new values, not differences); with ``output_token_indices`` the same beside an untied
output layer (``lm_head/trainable_tokens_delta``), replacing those columns of its ``[d_model, vocab]`` kernel
(:func:`token_sites`).

Targets are named as in Hugging Face PEFT, by the last component of the Hugging Face module name
(``q``, ``v``, ``wi_0`` for T5; ``q_proj``, ``gate_proj`` for LLaMA), and PEFT matches a name
wherever it occurs: ``q`` on T5 adapts the encoder's and the decoder's self-attention and the
decoder's cross-attention (``EncDecAttention.q``). ``lm_head`` adapts an untied output layer (``lm_head/kernel
[d_model, vocab]``), the one target outside the layers. Which llmjax kernel is which module comes from
the family's Hugging Face table (:mod:`llmjax.hf`), the one place that knows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax import hf
from llmjax.adapter_configs import (  # noqa: F401 (re-exported)
    ALL_LINEAR, FAMILY_TARGETS, INPUT_EMBEDDING, OUTPUT_LAYER, PISSA, LoraConfig, LoraConfigError, check_lora_targets,
    check_trainable_tokens, resolve_targets,
)
from llmjax.models.layers import Dense

LORA_A, LORA_B = "lora_A", "lora_B"
MAGNITUDE = "lora_magnitude_vector"  # DoRA's trained magnitude per output channel (PEFT's name)
INIT_A, INIT_B = "lora_A_init", "lora_B_init"  # PiSSA's A0, B0: the adapters' frozen starting point
FROZEN_LEAVES = (INIT_A, INIT_B)  # adapter leaves that never train
TOKENS = "trainable_tokens_delta"  # the trained rows of trainable_token_indices, beside the input embedding
_LAYER_KEY = re.compile(r"layers_(\d+)")

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted kernel: its path in the model's layout and the HF module of each layer it holds.

    path: keys to the Dense module (without ``kernel``) in the model's param tree, scanned or not.
    hf_modules: one HF module name (``encoder.block.3.layer.0.SelfAttention.q``) per layer, in layer
      order: one for an unscanned kernel, L for a scanned stack.
    unscanned: the unscanned module path of each of those layers (``.../layers_3/self_attention/q``).
    """

    path: Path
    hf_modules: tuple[str, ...]
    unscanned: tuple[Path, ...]

    @property
    def stacked(self) -> bool:
        return any(key == "layers" for key in self.path)


def _stacked_path(path: Path) -> Path:
    """An unscanned path (``.../layers_3/...``) in the scanned layout (``.../layers/...``)."""
    return tuple("layers" if _LAYER_KEY.fullmatch(k) else k for k in path)


def _layer_index(path: Path) -> int:
    """The layer an unscanned path is in (0 outside the layers)."""
    return next((int(match.group(1)) for k in path if (match := _LAYER_KEY.fullmatch(k))), 0)


def sites(config, cfg: LoraConfig) -> list[Site]:
    """The kernels ``cfg`` adapts in the model of ``config`` (scanned layout when ``config.scan_layers``).

    ``all-linear`` adapts every projection inside the layers; ``lm_head`` an untied output layer. Raises
    :class:`LoraConfigError` for a target this model does not have, listing the ones it has.
    """
    check_lora_targets(cfg, config)  # a target this model lacks (a tied head included), named with the ones it has
    weights = hf.weight_map(config)
    by_target: dict[str, list] = {}
    for row in weights.rows:
        in_layer = any(_LAYER_KEY.fullmatch(key) for key in row.path)
        if row.path[-1] == "kernel" and (in_layer or row.path[:-1] == (OUTPUT_LAYER,)):
            module = row.hf_name.rsplit(".", 1)[0]
            by_target.setdefault(module.rsplit(".", 1)[-1], []).append((module, row.path[:-1]))
    targets = resolve_targets(cfg, config).target_modules
    grouped: dict[Path, list] = {}
    for target in targets:
        for module, path in by_target[target]:
            key = _stacked_path(path) if config.scan_layers else path
            grouped.setdefault(key, []).append((_layer_index(path), module, path))
    return [Site(path, tuple(m for _, m, _ in sorted(group)), tuple(p for _, _, p in sorted(group)))
            for path, group in grouped.items()]


@dataclasses.dataclass(frozen=True)
class SavedLeaf:
    """One weight a ``modules_to_save`` entry trains in full: its path in the model's layout (a stack's when
    scanned), the HF tensor of each layer it holds (one, or L in layer order), each layer's unscanned path, and
    whether HF stores it transposed."""

    path: Path
    hf_names: tuple[str, ...]
    unscanned: tuple[Path, ...]
    transpose: bool

    @property
    def stacked(self) -> bool:
        return "layers" in self.path


def _aliases(weights) -> dict[str, str]:
    """HF modules that read another module's weight under a second name -> that module: a tied head (the table's
    ``tied`` tensors) and the family's ``aliases`` (T5's ``encoder.embed_tokens``, which is ``shared``)."""
    tied = {alias.rsplit(".", 1)[0]: source.rsplit(".", 1)[0] for alias, source in weights.tied.items()}
    return {**tied, **weights.aliases}


def saves(module: str, entry: str, *, legacy: bool = False) -> bool:
    """Whether the ``modules_to_save`` entry picks the Hugging Face module named ``module``, by PEFT's rule: since
    ``peft`` 0.22 the module of that name or one whose name ends with ``"." + entry`` (the rule of
    ``target_modules``); before it (``legacy``), any module whose name ends with the entry as a plain string, so
    ``layer_norm`` took T5's ``final_layer_norm`` too."""
    return module.endswith(entry) if legacy else module == entry or module.endswith("." + entry)


def _modules(weights) -> tuple[dict[str, list], dict[str, str]]:
    """``(rows_of, aliases)``: every HF module with weights under it (a layer, a block, a projection, a norm) ->
    those weights' rows of the weight map, and the modules that read another's weight (:func:`_aliases`)."""
    rows_of: dict[str, list] = {}
    for row in weights.rows:
        parts = row.hf_name.split(".")[:-1]
        for end in range(1, len(parts) + 1):
            rows_of.setdefault(".".join(parts[:end]), []).append(row)
    return rows_of, _aliases(weights)


def module_names(config) -> list[str]:
    """The Hugging Face module names ``modules_to_save`` can pick on the model of ``config``: every module with
    weights under it, and those that read another module's weight under a second name (a tied head, T5's
    ``encoder.embed_tokens``)."""
    rows_of, aliases = _modules(hf.weight_map(config))
    return [*rows_of, *aliases]


def picked(names, entries, *, legacy: bool = False) -> set[str]:
    """The module ``names`` that ``modules_to_save`` ``entries`` pick by PEFT's rule (:func:`saves`)."""
    return {m for m in names if any(saves(m, e, legacy=legacy) for e in entries)}


def rule_dependent(config, entries) -> bool:
    """Whether ``modules_to_save`` ``entries`` pick other modules of the model of ``config`` by ``peft``'s rule
    before 0.22 than by its rule since (:func:`saves`), as T5's ``layer_norm`` does (``final_layer_norm``)."""
    names = module_names(config)
    return picked(names, entries, legacy=True) != picked(names, entries)


def saved_leaves(config, cfg: LoraConfig) -> list[SavedLeaf]:
    """The weights ``cfg.modules_to_save`` trains in full on the model of ``config``.

    PEFT's rule (:func:`saves`, ``peft`` 0.22's) picks the modules: every module (a layer, a block, a projection, a
    norm) whose Hugging Face name is an entry or ends with ``"." + entry`` (so ``layer_norm`` takes T5's norms
    inside the blocks and ``final_layer_norm`` the stacks' last ones). Raises :class:`LoraConfigError`, naming the
    fix, for an entry that matches no module with weights, for a match inside another match, for a module LoRA
    also adapts, for a weight read under two names (T5's shared embedding, a tied head: PEFT would train separate
    copies of one weight) and, with scanned layers, for a module saved in some layers of a stack only (a stack
    trains as one array).
    """
    if not cfg.modules_to_save:
        return []
    weights = hf.weight_map(config)
    rows_of, aliases = _modules(weights)
    names = [*rows_of, *aliases]
    unmatched = [entry for entry in cfg.modules_to_save if not any(saves(m, entry) for m in names)]
    if unmatched:
        examples = sorted({m.rsplit(".", 1)[-1] for m in rows_of if not m.rsplit(".", 1)[-1].isdigit()})
        raise LoraConfigError(f"lora modules_to_save {unmatched} match no module with weights of this {weights.family} "
                              f"model (PEFT's rule: the module of that name, or one whose name ends with '.' and the "
                              f"entry); its module names end in {examples}")
    chosen = [m for m in names if any(saves(m, entry) for entry in cfg.modules_to_save)]
    shared = set(aliases.values()) | set(aliases)
    tied = [m for m in chosen if m in shared or any(m.startswith(s + ".") for s in shared)
            or any(s.startswith(m + ".") for s in shared)]
    if tied:
        raise LoraConfigError(
            f"lora modules_to_save matches {tied}, whose weights the model reads under more than one name (a shared "
            "or tied embedding); PEFT would train a separate copy for each name, which one weight cannot hold. Save "
            "other modules, or untie the embedding first")
    nested = [(outer, inner) for outer in chosen for inner in chosen if inner.startswith(outer + ".")]
    if nested:
        raise LoraConfigError(f"lora modules_to_save matches {nested[0][0]!r} and {nested[0][1]!r} inside it; name "
                              "the modules so that no match holds another (PEFT would wrap both)")
    rows = list({row.hf_name: row for m in chosen for row in rows_of[m]}.values())
    adapted = {path for site in sites(config, cfg) for path in site.unscanned}
    overlap = sorted(row.hf_name for row in rows if row.path[:-1] in adapted)
    if overlap:
        raise LoraConfigError(f"lora modules_to_save and target_modules both take {overlap[:3]}; a module trains "
                              "either in full or through LoRA, so drop it from one of the two lists")
    grouped: dict[Path, list] = {}
    for row in rows:
        key = _stacked_path(row.path) if config.scan_layers else row.path
        grouped.setdefault(key, []).append((_layer_index(row.path), row))
    leaves = []
    for path, group in grouped.items():
        if "layers" in path:  # a stack (scanned layers)
            count = sum(1 for row in weights.rows if _stacked_path(row.path) == path)
            if len(group) != count:
                raise LoraConfigError(
                    f"lora modules_to_save saves {'/'.join(path)} in {len(group)} of its {count} layers; with "
                    "scan_layers a stack trains as one array, so save the module in every layer (name it by its "
                    "last part, e.g. 'layer_norm') or load the model with scan_layers=false")
        group.sort(key=lambda item: item[0])
        leaves.append(SavedLeaf(path, tuple(row.hf_name for _, row in group), tuple(row.path for _, row in group),
                                group[0][1].transpose))
    return leaves


@dataclasses.dataclass(frozen=True)
class TokenSite:
    """Where token rows train: the weight in the params (``embed/embedding``, or an untied head's ``lm_head/kernel``
    ``[d_model, vocab]``, whose columns are the rows), its Hugging Face module (``model.embed_tokens``, ``lm_head``),
    the token ids, and the adapters' leaf of the trained rows ``[n, d_model]`` (beside the weight)."""

    weight: Path
    hf_module: str
    indices: tuple[int, ...] = ()
    output: bool = False  # the weight is an output layer's kernel: the rows are its columns

    @property
    def rows(self) -> Path:
        return self.weight[:-1] + (TOKENS,)

    @property
    def width_axis(self) -> int:
        """The weight's ``d_model`` axis: an embedding's last, a head kernel's first."""
        return 0 if self.output else -1


def token_sites(config, cfg: LoraConfig) -> tuple[TokenSite, ...]:
    """The weights whose token rows ``cfg`` trains: the input embedding's ``cfg.trainable_token_indices`` (a
    decoder's ``model.embed_tokens``, T5's ``shared``, which its stacks read as ``embed_tokens``), then an untied
    output layer's ``cfg.output_token_indices`` (``lm_head``); empty without them. Raises :class:`LoraConfigError`
    where a model cannot have them (:func:`llmjax.adapter_configs.check_trainable_tokens`) and for a weight
    ``modules_to_save`` also trains in full (one or the other, as PEFT says)."""
    if not cfg.trainable_token_indices and not cfg.output_token_indices:
        return ()
    check_trainable_tokens(cfg, config)
    weights = hf.weight_map(config)
    owners, aliases = {row.hf_name.rsplit(".", 1)[0]: row for row in weights.rows}, _aliases(weights)
    found = []
    if cfg.trainable_token_indices:
        module = next(m for m in [*owners, *aliases] if m.rsplit(".", 1)[-1] == INPUT_EMBEDDING)
        found.append((owners[aliases.get(module, module)], cfg.trainable_token_indices, False))
    if cfg.output_token_indices:
        found.append((owners[OUTPUT_LAYER], cfg.output_token_indices, True))
    saved = {leaf.path for leaf in saved_leaves(config, cfg)}
    for row, _, _ in found:
        if row.path in saved:
            raise LoraConfigError(f"lora modules_to_save trains {row.hf_name.rsplit('.', 1)[0]} in full and "
                                  "trainable_token_indices some of its rows; keep one of the two")
    return tuple(TokenSite(row.path, row.hf_name.rsplit(".", 1)[0], ids, output) for row, ids, output in found)


def _get(tree: Mapping, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _replace(tree: Mapping, path: Path, value) -> dict:
    """A copy of ``tree`` with fresh dicts along ``path`` and ``value`` at its end (the rest shared)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _replace(tree[path[0]], path[1:], value)
    return out


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def unboxed(x):
    """The array inside an ``nn.Partitioned`` box, or ``x`` itself."""
    return x.value if _is_box(x) else x


def init(model, params, cfg: LoraConfig, key: jax.Array, pissa_start: Mapping | None = None) -> dict:
    """Fresh adapters for ``model`` (``[in, r]`` A random, ``[r, out]`` B zeros, fp32): step 0 equals the base.

    ``params``: the model's params (plain arrays, ``ShapeDtypeStruct``s, or ``nn.Partitioned`` boxes as ``model.init``
    returns them); only their kernels' shapes and boxes are read. With boxes, A is boxed with the kernel's axes
    ``(..., in_axis, None)`` and B with ``(..., None, out_axis)``, so the adapters shard like their kernels. A is
    drawn like PEFT's ``kaiming_uniform_(a=sqrt(5))``, i.e. uniform in ``±1/sqrt(in)``, one key per HF module (so a
    scanned and an unscanned model get the same adapters). With ``cfg.use_dora`` each module also gets its magnitude,
    the kernel's column norms (so step 0 still equals the base): then the kernels' values are read, and
    ``ShapeDtypeStruct`` kernels give a ``ShapeDtypeStruct`` magnitude. With ``cfg.modules_to_save`` each of their
    weights is copied in fp32 at its own path (:func:`saved_leaves`), boxed as the base's. With
    ``init_lora_weights="pissa"`` A and B are the kernel's principal factors (:func:`pissa_factors`, no key used),
    also kept as the frozen ``lora_A_init`` / ``lora_B_init``. With ``trainable_token_indices`` the input embedding's
    rows of those tokens are copied in fp32 (:func:`token_sites`), boxed ``(None, embed)``, and so are an untied
    head's columns of ``output_token_indices``, as rows. ``pissa_start`` (adapters
    that ``init`` made from the same kernels as host arrays) gives them without an SVD in the traced program, which a
    jitted init sharded over several CPU devices needs: there XLA's CPU runtime can deadlock on a decomposition
    between collectives. Pure: works under ``jit`` and ``eval_shape``.
    """
    adapters: dict = {}
    targets = sites(model.config, cfg)
    index = {module: i for i, module in enumerate(sorted(m for site in targets for m in site.hf_modules))}
    for site in targets:
        kernel = _get(params, site.path + ("kernel",))
        shape = unboxed(kernel).shape
        fan_in, fan_out = shape[-2], shape[-1]
        if cfg.init_lora_weights == PISSA:
            value = unboxed(kernel)
            if pissa_start is not None:
                start = _get(pissa_start, site.path)
                a, b = (jnp.asarray(unboxed(start[name]), jnp.float32) for name in (LORA_A, LORA_B))
            elif isinstance(value, jax.ShapeDtypeStruct):
                a = jax.ShapeDtypeStruct(shape[:-1] + (cfg.r,), jnp.float32)
                b = jax.ShapeDtypeStruct(shape[:-2] + (cfg.r, fan_out), jnp.float32)
            else:
                a, b = (jnp.asarray(x) for x in pissa_factors(value, cfg.r, cfg.scale))
        else:
            bound = 1.0 / math.sqrt(fan_in)
            draws = [jax.random.uniform(jax.random.fold_in(key, index[m]), (fan_in, cfg.r), jnp.float32,
                                        -bound, bound) for m in site.hf_modules]
            a = jnp.stack(draws) if site.stacked else draws[0]
            b = jnp.zeros(shape[:-2] + (cfg.r, fan_out), jnp.float32)
        if _is_box(kernel):
            names = kernel.names
            a = kernel.replace(value=a, names=names[:-1] + (None,))
            b = kernel.replace(value=b, names=names[:-2] + (None, names[-1]))
        node = {LORA_A: a, LORA_B: b}
        if cfg.init_lora_weights == PISSA:
            node.update({INIT_A: a, INIT_B: b})
        if cfg.use_dora:
            value = unboxed(kernel)
            m = (jax.ShapeDtypeStruct(shape[:-2] + shape[-1:], jnp.float32) if isinstance(value, jax.ShapeDtypeStruct)
                 else column_norms(value.astype(jnp.float32)))
            node[MAGNITUDE] = kernel.replace(value=m, names=kernel.names[:-2] + kernel.names[-1:]) if _is_box(
                kernel) else m
        _set(adapters, site.path, node)
    for leaf in saved_leaves(model.config, cfg):
        weight = _get(params, leaf.path)
        value = unboxed(weight)
        copy = (jax.ShapeDtypeStruct(value.shape, jnp.float32) if isinstance(value, jax.ShapeDtypeStruct)
                else jnp.asarray(value, jnp.float32))
        _set(adapters, leaf.path, weight.replace_boxed(copy) if _is_box(weight) else copy)
    for site in token_sites(model.config, cfg):
        weight = _get(params, site.weight)
        value = unboxed(weight)
        shape = (len(site.indices), value.shape[site.width_axis])
        ids = np.asarray(site.indices)
        rows = (jax.ShapeDtypeStruct(shape, jnp.float32) if isinstance(value, jax.ShapeDtypeStruct)
                else jnp.asarray(value[:, ids].T if site.output else value[ids], jnp.float32))
        if _is_box(weight):  # sharded like the weight's model axis
            rows = weight.replace(value=rows, names=(None, weight.names[0] if site.output else weight.names[1]))
        _set(adapters, site.rows, rows)
    return adapters


def column_norms(kernel: jax.Array) -> jax.Array:
    """The L2 norm of each output channel of ``[..., in, out]`` kernels: ``[..., out]``."""
    return jnp.sqrt(jnp.sum(jnp.square(kernel), axis=-2))


def pissa_factors(kernel: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """PiSSA's starting adapters for float ``kernel [..., in, out]``: ``A0 [..., in, r]`` and ``B0 [..., r, out]``
    from its ``r`` largest singular triplets, ``kernel = U S V^T``, with ``sqrt(S_r / scale)`` on each side, so that
    ``scale * A0 @ B0`` is the kernel's best rank-r approximation (PEFT's ``pissa`` init, in llmjax's layout). The
    signs of singular vectors are arbitrary; ``A0 @ B0`` is not. A concrete kernel gives numpy arrays (the SVD runs on
    the host), a traced one traced arrays."""
    if isinstance(kernel, jax.core.Tracer):
        u, s, vh = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
        root = jnp.sqrt(s[..., :r] / scale)
    else:  # a concrete kernel is decomposed on the host (numpy's LAPACK), outside any sharded program
        u, s, vh = np.linalg.svd(np.asarray(jax.device_get(kernel), np.float32), full_matrices=False)
        root = np.sqrt(s[..., :r] / np.float32(scale))
    return u[..., :r] * root[..., None, :], root[..., :, None] * vh[..., :r, :]


def pissa_initial(params, adapters, cfg: LoraConfig) -> dict:
    """``adapters`` of a PiSSA run as a checkpoint holds them (A and B only) with the frozen ``lora_A_init`` /
    ``lora_B_init`` computed again from ``params``' kernels (:func:`pissa_factors`, deterministic): what
    :func:`merge` needs. Any other adapters are returned as they are."""
    if cfg.init_lora_weights != PISSA:
        return adapters
    out = adapters
    for path in _adapted_paths(adapters):
        node = _get(adapters, path)
        if INIT_A in node:
            continue
        a0, b0 = pissa_factors(unboxed(_get(params, path + ("kernel",))), cfg.r, cfg.scale)
        out = _replace(out, path, {**node, INIT_A: a0, INIT_B: b0})
    return out


def pissa_as_lora(adapters, cfg: LoraConfig) -> tuple[dict, LoraConfig]:
    """PiSSA adapters as the plain LoRA that PEFT's ``path_initial_model_for_weight_conversion`` saves: ``[A | A0]``
    ``[in, 2r]`` and ``[B; -B0]`` ``[2r, out]`` at rank ``2r`` with the same scale (``lora_alpha`` doubled, or times
    sqrt(2) with rsLoRA), whose update ``scale * (A @ B - A0 @ B0)`` applies to the unchanged base. Other leaves
    (``modules_to_save`` copies) are kept; the boxes are dropped."""
    out = adapters
    for path in _adapted_paths(adapters):
        node = _get(adapters, path)
        check_pissa(INIT_A in node, cfg, path)
        a = jnp.concatenate([unboxed(node[LORA_A]), unboxed(node[INIT_A])], axis=-1)
        b = jnp.concatenate([unboxed(node[LORA_B]), -unboxed(node[INIT_B])], axis=-2)
        out = _replace(out, path, {LORA_A: a, LORA_B: b})
    alpha = cfg.lora_alpha * (math.sqrt(2) if cfg.use_rslora else 2)
    return out, dataclasses.replace(cfg, r=2 * cfg.r, lora_alpha=alpha, init_lora_weights=True)


def dora_factor(kernel: jax.Array, adapters_at_site: Mapping, scale: float) -> jax.Array:
    """DoRA's rescaling of each output channel, ``m / ||kernel + scale * A @ B||`` (``[..., out]``, fp32), for a
    float ``kernel [..., in, out]``. The norm is held constant in the backward pass (``stop_gradient``), as the
    DoRA paper (section 4.3) and PEFT do: gradients reach ``m`` through the ratio and A, B through the update."""
    adapted = kernel.astype(jnp.float32) + delta(adapters_at_site, scale)
    return unboxed(adapters_at_site[MAGNITUDE]) / jax.lax.stop_gradient(column_norms(adapted))


def delta(adapters_at_site: Mapping, scale: float) -> jax.Array:
    """``scale * A @ B`` (PiSSA's ``scale * (A @ B - A0 @ B0)``): ``[in, out]``, or ``[L, in, out]`` for a stack
    (fp32)."""
    def product(a, b):
        return scale * jnp.einsum("...ir,...ro->...io", a, b, preferred_element_type=jnp.float32)

    update = product(unboxed(adapters_at_site[LORA_A]), unboxed(adapters_at_site[LORA_B]))
    if INIT_A in adapters_at_site:  # PiSSA's starting point, frozen
        update = update - jax.lax.stop_gradient(product(*(unboxed(adapters_at_site[k]) for k in FROZEN_LEAVES)))
    return update


def _adapted_paths(adapters: Mapping, prefix: Path = ()) -> list[Path]:
    """Paths of the module dicts holding ``lora_A``/``lora_B`` in an adapters tree."""
    if LORA_A in adapters or LORA_B in adapters:
        return [prefix]
    return [p for key, sub in adapters.items() if isinstance(sub, Mapping)
            for p in _adapted_paths(sub, prefix + (key,))]


_ADAPTER_LEAVES = (LORA_A, LORA_B, MAGNITUDE, *FROZEN_LEAVES)  # what an adapted module's dict holds of LoRA's own


def _saved_paths(adapters: Mapping, prefix: Path = ()) -> list[Path]:
    """Paths of the full weight copies in an adapters tree: its leaves outside LoRA's but the token rows. They are
    the ``modules_to_save`` copies and, beside an adapted output layer's A and B, the head's own weight when a PEFT
    adapter stored it (PEFT's ``save_embedding_layers``: the adapter then applies to that weight)."""
    if LORA_A in adapters or LORA_B in adapters:
        return [prefix + (key,) for key in adapters if key not in _ADAPTER_LEAVES]
    return [p for key, sub in adapters.items() if key != TOKENS
            for p in (_saved_paths(sub, prefix + (key,)) if isinstance(sub, Mapping) else [prefix + (key,)])]


def _token_paths(adapters: Mapping, prefix: Path = ()) -> list[Path]:
    """Paths of the trained token rows (``TOKENS``) in an adapters tree."""
    return [p for key, sub in adapters.items()
            for p in ([prefix + (key,)] if key == TOKENS else
                      _token_paths(sub, prefix + (key,)) if isinstance(sub, Mapping) else [])]


def lora_part(adapters: Mapping) -> dict:
    """``adapters`` without the full weight copies and token rows: the A, B (and DoRA, PiSSA) leaves alone."""
    if not _saved_paths(adapters) and not _token_paths(adapters):
        return adapters
    out: dict = {}
    for path in _adapted_paths(adapters):
        _set(out, path, {key: value for key, value in _get(adapters, path).items() if key in _ADAPTER_LEAVES})
    return out


def with_saved(params, adapters: Mapping, token_indices: tuple[int, ...] = (),
               output_token_indices: tuple[int, ...] = ()):
    """``params`` with each ``modules_to_save`` copy in ``adapters`` in place of the base's weight, the trained
    token rows in place of the input embedding's rows ``token_indices`` (``LoraConfig.trainable_token_indices``)
    and in place of an untied head's columns ``output_token_indices`` (``LoraConfig.output_token_indices``), cast to
    the weight's dtype, its box kept; the other leaves shared. Pure and jittable."""
    out = _with_token_rows(params, adapters, token_indices, output_token_indices)
    for path in _saved_paths(adapters):
        try:
            weight = _get(params, path)
        except (KeyError, TypeError):
            raise LoraConfigError(f"adapters hold a trained copy of {'/'.join(path)}, which these params lack; were "
                                  "they made for this model?") from None
        value = unboxed(weight)
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise LoraConfigError(f"adapters hold a trained copy of {'/'.join(path)}, but these params store it as "
                                  f"{value.dtype} (an int8 model); load the base in float to use these adapters")
        copy = unboxed(_get(adapters, path)).astype(value.dtype)
        out = _replace(out, path, weight.replace_boxed(copy) if _is_box(weight) else copy)
    return out


def _with_token_rows(params, adapters: Mapping, token_indices: tuple[int, ...],
                     output_token_indices: tuple[int, ...]):
    paths = _token_paths(adapters)
    kinds = {}  # each rows' leaf -> whether it is an output layer's (beside a kernel) or the embedding's
    for path in paths:
        try:
            owner = _get(params, path[:-1])
        except (KeyError, TypeError):
            owner = {}
        if "embedding" not in owner and "kernel" not in owner:  # nn.Embed's weight, or a head's Dense kernel
            raise LoraConfigError(f"adapters hold token rows for {'/'.join(path[:-1])}, which these params lack; "
                                  "were they made for this model?")
        kinds[path] = "kernel" in owner
    out = params
    for output, ids, field in ((False, token_indices, "trainable_token_indices"),
                               (True, output_token_indices, "output_token_indices")):
        held = [path for path in paths if kinds[path] == output]
        if bool(held) != bool(ids):
            what = "an output layer's" if output else "the input embedding's"
            have = f"hold trained token rows ({'/'.join(held[0])})" if held else f"hold no {what} trained token rows"
            raise LoraConfigError(f"adapters {have} but the LoRA config has {field}={list(ids)}; use the config the "
                                  "adapters were made with")
        for path in held:
            weight_path = path[:-1] + ("kernel" if output else "embedding",)
            weight = _get(params, weight_path)
            value, rows = unboxed(weight), unboxed(_get(adapters, path))
            if not jnp.issubdtype(value.dtype, jnp.floating):
                raise LoraConfigError(f"adapters hold token rows of {'/'.join(weight_path)}, but these params store "
                                      f"it as {value.dtype} (an int8 model); load the base in float to use these "
                                      "adapters")
            width = value.shape[0 if output else -1]
            if rows.shape != (len(ids), width):
                raise LoraConfigError(f"adapters' {'/'.join(path)} has shape {tuple(rows.shape)}, expected "
                                      f"{(len(ids), width)} for {field} {list(ids)}; use the config the adapters "
                                      "were made with")
            rows = jnp.asarray(rows).astype(value.dtype)
            moved = (jnp.asarray(value).at[:, np.asarray(ids)].set(rows.T) if output
                     else jnp.asarray(value).at[np.asarray(ids)].set(rows))
            out = _replace(out, weight_path, weight.replace_boxed(moved) if _is_box(weight) else moved)
    return out


def adapter_leaves(cfg: LoraConfig) -> tuple[str, ...]:
    """The leaves each adapted module holds: A and B, DoRA's magnitude with ``cfg.use_dora``, PiSSA's frozen A0
    and B0 with ``init_lora_weights="pissa"``."""
    return ((LORA_A, LORA_B) + ((MAGNITUDE,) if cfg.use_dora else ())
            + (FROZEN_LEAVES if cfg.init_lora_weights == PISSA else ()))


def check_pissa(has_init: bool, cfg: LoraConfig, path: Path) -> None:
    """Refuse PiSSA adapters without their starting point, or a starting point the config does not expect."""
    if has_init != (cfg.init_lora_weights == PISSA):
        fix = ("add it with llmjax.lora.pissa_initial(params, adapters, cfg)" if not has_init
               else "use the config the adapters were made with")
        raise LoraConfigError(f"adapters {'have' if has_init else 'have no'} {'/'.join(path)}/{INIT_A} but the LoRA "
                              f"config has init_lora_weights={cfg.init_lora_weights!r}; {fix}")


def check_dora(has_magnitude: bool, cfg: LoraConfig, path: Path) -> None:
    """Refuse adapters whose DoRA magnitude disagrees with ``cfg.use_dora`` (one would be silently ignored)."""
    if cfg.use_dora != has_magnitude:
        have = "have" if has_magnitude else "have no"
        raise LoraConfigError(
            f"adapters {have} {'/'.join(path)}/{MAGNITUDE} but the LoRA config has use_dora={cfg.use_dora}; "
            "use the config the adapters were made with (llmjax.lora.init with that config)")


def _shift(params, adapters, cfg: LoraConfig, sign: float):
    out = params
    for path in _adapted_paths(adapters):
        kernel = _get(params, path + ("kernel",))
        value = unboxed(kernel)
        at_site = _get(adapters, path)
        check_dora(MAGNITUDE in at_site, cfg, path)
        check_pissa(INIT_A in at_site, cfg, path)
        moved = value.astype(jnp.float32) + sign * delta(at_site, cfg.scale)
        if cfg.use_dora:
            moved = moved * dora_factor(value, at_site, cfg.scale)[..., None, :]
        moved = moved.astype(value.dtype)
        out = _replace(out, path + ("kernel",), kernel.replace_boxed(moved) if _is_box(kernel) else moved)
    return out


def merge(params, adapters, cfg: LoraConfig):
    """Params with each ``modules_to_save`` weight replaced by the adapters' trained copy (and a head by the weight
    a PEFT adapter stored for it, and the trained token rows: :func:`with_saved`),
    then each adapted kernel by ``kernel + scale * A @ B`` (in the kernel's dtype),
    for DoRA ``(kernel + scale * A @ B) * dora_factor`` per output channel.

    Pure and jittable; untouched leaves are shared, not copied. Works on either layout (the adapters
    must come from the same one).
    """
    tokens = (cfg.trainable_token_indices, cfg.output_token_indices)
    return _shift(with_saved(params, adapters, *tokens), lora_part(adapters), cfg, 1.0)


def unmerge(merged, adapters, cfg: LoraConfig):
    """The inverse of :func:`merge`: ``kernel - scale * A @ B`` (exact up to float rounding).

    Refused for ``modules_to_save`` and token rows (the merge overwrote those weights) and for DoRA:
    its merge rescales each output channel by ``m / ||kernel + scale * A @ B||``, a norm of the kernel before merging,
    and the merged kernel alone does not determine it (every multiple of the merged kernel, less the update, merges
    back to the same kernel). PEFT keeps the norm in a cache, and the saved modules' originals beside their copies;
    llmjax's functions keep nothing, so keep the base params and merge each adapter into them (as ``llmjax evaluate``
    and ``generate`` do with several adapters).
    """
    if cfg.use_dora:
        raise LoraConfigError("lora.unmerge cannot undo a DoRA merge: the merged kernel does not determine the norm "
                              "it was scaled by; keep the base params and merge the adapters into them instead")
    token_rows = cfg.trainable_token_indices or cfg.output_token_indices
    if cfg.modules_to_save or _saved_paths(adapters) or token_rows:
        what = "trainable_token_indices" if token_rows else "modules_to_save"
        raise LoraConfigError(f"lora.unmerge cannot undo {what}: the merge replaced those weights and the "
                              "base's are not in the merged params; keep the base params and merge the adapters "
                              "into them instead")
    return _shift(merged, adapters, cfg, -1.0)


COLLECTION = "lora"  # the variable collection apply_factored passes the adapters in (scanned like params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def adapter_branch(x, a, b, scale: float):
    """``scale * (x @ A) @ B`` for ``x [..., in]``, ``A [in, r]``, ``B [r, out]``, with a hand-written backward.

    The gradients are the automatic ones, ``dB = scale * (x A)^T g`` and ``dA = scale * x^T (g B^T)``, written
    as contractions over the token axis of both operands. Left to autodiff, XLA's CPU backend formed ``dB``
    by transposing the ``[tokens, out]`` gradient, fused with the elementwise work before it: on the 60M
    decoder with every projection adapted those transposes took about a sixth of the step
    (``benchmarks/lora_train.py --targets all``)."""
    return _adapter_branch_fwd(x, a, b, scale)[0]


def _adapter_branch_fwd(x, a, b, scale):
    xa = x @ a
    return scale * (xa @ b), (x, xa, a, b)


def _adapter_branch_bwd(scale, residuals, g):
    x, xa, a, b = residuals
    g = scale * g
    gb = g @ b.T  # [..., r]
    dx = gb @ a.T
    da = jnp.einsum("...r,...i->ir", gb, x)
    db = jnp.einsum("...r,...o->ro", xa, g)
    return dx, da, db


adapter_branch.defvjp(_adapter_branch_fwd, _adapter_branch_bwd)


def apply_factored(model, params, adapters, cfg: LoraConfig, *args, rngs=None, **kwargs):
    """``model.apply`` with each adapted ``Dense`` computed factored: ``x @ W + scale * (drop(x) @ A) @ B``.

    Equals ``model.apply({"params": merge(params, adapters, cfg)}, ...)`` up to rounding, without forming
    the merged kernels, so the backward pass needs no full-size kernel gradient. ``drop`` is dropout
    with rate ``cfg.lora_dropout`` on the adapter's input (PEFT's), applied only when ``rngs`` has a
    ``"dropout"`` key. The adapters travel as the ``"lora"`` variable collection, which has the params'
    nesting, and are picked up by a method interceptor: the model's code does not know about them.
    The adapter branch runs in fp32 and is cast to the layer's output dtype. With DoRA the layer gives
    ``y + (f - 1) * drop(x) @ W + f * scale * (drop(x) @ A) @ B`` for ``f = dora_factor`` and ``y = x @ W``
    (PEFT's form: without dropout, ``f * (y + scale * (x @ A) @ B)``); an int8 kernel is dequantized for its norm.
    The ``modules_to_save`` copies and the token rows replace the base's in the params the model reads
    (:func:`with_saved`).
    PiSSA adapters add ``- scale * (x @ A0) @ B0`` (no dropout: it stands for the residual kernel PEFT computes with).
    """
    def interceptor(next_fun, call_args, call_kwargs, context):
        y = next_fun(*call_args, **call_kwargs)
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, Dense)
                or not module.has_variable(COLLECTION, LORA_A)):
            return y
        x = call_args[0].astype(jnp.float32)
        dropped = x
        if cfg.lora_dropout > 0 and module.scope.has_rng("dropout"):
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.lora_dropout, x.shape)
            dropped = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0.0)
        check_dora(module.has_variable(COLLECTION, MAGNITUDE), cfg, tuple(module.scope.path))
        check_pissa(module.has_variable(COLLECTION, INIT_A), cfg, tuple(module.scope.path))
        at_site = {name: unboxed(module.get_variable(COLLECTION, name)) for name in adapter_leaves(cfg)}
        branch = adapter_branch(dropped, at_site[LORA_A], at_site[LORA_B], cfg.scale)
        if cfg.init_lora_weights == PISSA:  # the frozen principal part leaves the base: PEFT's W_res, undropped
            start = [jax.lax.stop_gradient(at_site[name]) for name in FROZEN_LEAVES]
            branch = branch - adapter_branch(x, *start, cfg.scale)
        if not cfg.use_dora:
            return y + branch.astype(y.dtype)
        kernel = unboxed(module.get_variable("params", "kernel")).astype(jnp.float32)
        if module.quantization is not None:
            kernel = kernel * unboxed(module.get_variable("params", "kernel_scale"))
        factor = dora_factor(kernel, at_site, cfg.scale)
        base = y.astype(jnp.float32) if dropped is x else dropped @ kernel
        return y + ((factor - 1.0) * base + factor * branch).astype(y.dtype)

    tokens = (cfg.trainable_token_indices, cfg.output_token_indices)
    variables = {"params": with_saved(params, adapters, *tokens), COLLECTION: lora_part(adapters)}
    with nn.intercept_methods(interceptor):
        return model.apply(variables, *args, rngs=rngs, **kwargs)
