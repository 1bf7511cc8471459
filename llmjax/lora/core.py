"""LoRA as parameter-pytree surgery: the config, where adapters go, their init, merge and unmerge.

The base model's code is untouched. Adapters are a separate nested dict with the same nesting as the
params down to each targeted ``Dense`` module, whose ``kernel`` ``[in, out]`` (``[L, in, out]`` in a
scanned stack) is shadowed by ``lora_A [in, r]`` and ``lora_B [r, out]`` (``[L, in, r]`` / ``[L, r, out]``),
both fp32. The adapted kernel is ``kernel + scale * A @ B`` with ``scale = lora_alpha / r`` (``lora_alpha /
sqrt(r)`` with ``use_rslora``). With ``use_dora`` (DoRA) the module also holds ``lora_magnitude_vector [out]``
(``[L, out]``), ``m``, and the adapted kernel is ``(kernel + scale * A @ B) * m / ||kernel + scale * A @ B||``,
the norm taken over the input axis for each output channel (PEFT's DoRA; :func:`dora_factor`).

Targets are named as in Hugging Face PEFT, by the last component of the Hugging Face module name
(``q``, ``v``, ``wi_0`` for T5; ``q_proj``, ``gate_proj`` for LLaMA), and PEFT matches a name
wherever it occurs: ``q`` on T5 adapts the encoder's and the decoder's self-attention and the
decoder's cross-attention (``EncDecAttention.q``). Which llmjax kernel is which module comes from
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

from llmjax import hf
from llmjax.adapter_configs import (  # noqa: F401 (re-exported)
    ALL_LINEAR, FAMILY_TARGETS, LoraConfig, LoraConfigError, resolve_targets,
)
from llmjax.models.layers import Dense

LORA_A, LORA_B = "lora_A", "lora_B"
MAGNITUDE = "lora_magnitude_vector"  # DoRA's trained magnitude per output channel (PEFT's name)
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


def sites(config, cfg: LoraConfig) -> list[Site]:
    """The kernels ``cfg`` adapts in the model of ``config`` (scanned layout when ``config.scan_layers``).

    ``all-linear`` adapts every projection inside the layers. Raises :class:`LoraConfigError` for a target
    this model does not have, listing the ones it has.
    """
    weights = hf.weight_map(config)
    by_target: dict[str, list] = {}
    for row in weights.rows:
        if row.path[-1] == "kernel" and any(_LAYER_KEY.fullmatch(key) for key in row.path):
            module = row.hf_name.rsplit(".", 1)[0]
            by_target.setdefault(module.rsplit(".", 1)[1], []).append((module, row.path[:-1]))
    targets = resolve_targets(cfg, config).target_modules
    missing = [t for t in targets if t not in by_target]
    if missing:
        raise LoraConfigError(
            f"lora target_modules {missing} are not modules of this {weights.family} model; its modules are "
            f"{sorted(by_target, key=list(FAMILY_TARGETS[weights.family]).index)}"
        )
    grouped: dict[Path, list] = {}
    for target in targets:
        for module, path in by_target[target]:
            key = tuple("layers" if _LAYER_KEY.fullmatch(k) else k for k in path) if config.scan_layers else path
            layer = next(int(_LAYER_KEY.fullmatch(k).group(1)) for k in path if _LAYER_KEY.fullmatch(k))
            grouped.setdefault(key, []).append((layer, module, path))
    return [Site(path, tuple(m for _, m, _ in sorted(group)), tuple(p for _, _, p in sorted(group)))
            for path, group in grouped.items()]


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


def init(model, params, cfg: LoraConfig, key: jax.Array) -> dict:
    """Fresh adapters for ``model`` (``[in, r]`` A random, ``[r, out]`` B zeros, fp32): step 0 equals the base.

    ``params``: the model's params (plain arrays, ``ShapeDtypeStruct``s, or ``nn.Partitioned`` boxes as
    ``model.init`` returns them); only their kernels' shapes and boxes are read. With boxes, A is boxed
    with the kernel's axes ``(..., in_axis, None)`` and B with ``(..., None, out_axis)``, so the adapters
    shard like their kernels. A is drawn like PEFT's ``kaiming_uniform_(a=sqrt(5))``, i.e. uniform in
    ``±1/sqrt(in)``, one key per HF module (so a scanned and an unscanned model get the same adapters).
    With ``cfg.use_dora`` each module also gets its magnitude, the kernel's column norms (so step 0 still
    equals the base): then the kernels' values are read, and ``ShapeDtypeStruct`` kernels give a
    ``ShapeDtypeStruct`` magnitude. Pure: works under ``jit`` and ``eval_shape``.
    """
    adapters: dict = {}
    targets = sites(model.config, cfg)
    index = {module: i for i, module in enumerate(sorted(m for site in targets for m in site.hf_modules))}
    for site in targets:
        kernel = _get(params, site.path + ("kernel",))
        shape = unboxed(kernel).shape
        fan_in, fan_out = shape[-2], shape[-1]
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
        if cfg.use_dora:
            value = unboxed(kernel)
            m = (jax.ShapeDtypeStruct(shape[:-2] + shape[-1:], jnp.float32) if isinstance(value, jax.ShapeDtypeStruct)
                 else column_norms(value.astype(jnp.float32)))
            node[MAGNITUDE] = kernel.replace(value=m, names=kernel.names[:-2] + kernel.names[-1:]) if _is_box(
                kernel) else m
        _set(adapters, site.path, node)
    return adapters


def column_norms(kernel: jax.Array) -> jax.Array:
    """The L2 norm of each output channel of ``[..., in, out]`` kernels: ``[..., out]``."""
    return jnp.sqrt(jnp.sum(jnp.square(kernel), axis=-2))


def dora_factor(kernel: jax.Array, adapters_at_site: Mapping, scale: float) -> jax.Array:
    """DoRA's rescaling of each output channel, ``m / ||kernel + scale * A @ B||`` (``[..., out]``, fp32), for a
    float ``kernel [..., in, out]``. The norm is held constant in the backward pass (``stop_gradient``), as the
    DoRA paper (section 4.3) and PEFT do: gradients reach ``m`` through the ratio and A, B through the update."""
    adapted = kernel.astype(jnp.float32) + delta(adapters_at_site, scale)
    return unboxed(adapters_at_site[MAGNITUDE]) / jax.lax.stop_gradient(column_norms(adapted))


def delta(adapters_at_site: Mapping, scale: float) -> jax.Array:
    """``scale * A @ B``: ``[in, out]``, or ``[L, in, out]`` for a stack (fp32)."""
    a, b = unboxed(adapters_at_site[LORA_A]), unboxed(adapters_at_site[LORA_B])
    return scale * jnp.einsum("...ir,...ro->...io", a, b, preferred_element_type=jnp.float32)


def _adapted_paths(adapters: Mapping, prefix: Path = ()) -> list[Path]:
    """Paths of the module dicts holding ``lora_A``/``lora_B`` in an adapters tree."""
    if LORA_A in adapters or LORA_B in adapters:
        return [prefix]
    return [p for key, sub in adapters.items() for p in _adapted_paths(sub, prefix + (key,))]


def adapter_leaves(cfg: LoraConfig) -> tuple[str, ...]:
    """The leaves each adapted module holds: A and B, and DoRA's magnitude with ``cfg.use_dora``."""
    return (LORA_A, LORA_B, MAGNITUDE) if cfg.use_dora else (LORA_A, LORA_B)


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
        moved = value.astype(jnp.float32) + sign * delta(at_site, cfg.scale)
        if cfg.use_dora:
            moved = moved * dora_factor(value, at_site, cfg.scale)[..., None, :]
        moved = moved.astype(value.dtype)
        out = _replace(out, path + ("kernel",), kernel.replace_boxed(moved) if _is_box(kernel) else moved)
    return out


def merge(params, adapters, cfg: LoraConfig):
    """Params with each adapted kernel replaced by ``kernel + scale * A @ B`` (in the kernel's dtype), for DoRA
    ``(kernel + scale * A @ B) * dora_factor`` per output channel.

    Pure and jittable; untouched leaves are shared, not copied. Works on either layout (the adapters
    must come from the same one).
    """
    return _shift(params, adapters, cfg, 1.0)


def unmerge(merged, adapters, cfg: LoraConfig):
    """The inverse of :func:`merge`: ``kernel - scale * A @ B`` (exact up to float rounding).

    Refused for DoRA: its merge rescales each output channel by ``m / ||kernel + scale * A @ B||``, a norm of
    the kernel before merging, and the merged kernel alone does not determine it (every multiple of the merged
    kernel, less the update, merges back to the same kernel). PEFT keeps the norm in a cache for this; llmjax's
    functions keep nothing, so keep the base params and merge each adapter into them (as ``llmjax evaluate`` and
    ``generate`` do with several adapters).
    """
    if cfg.use_dora:
        raise LoraConfigError("lora.unmerge cannot undo a DoRA merge: the merged kernel does not determine the norm "
                              "it was scaled by; keep the base params and merge the adapters into them instead")
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
        at_site = {name: unboxed(module.get_variable(COLLECTION, name)) for name in adapter_leaves(cfg)}
        branch = adapter_branch(dropped, at_site[LORA_A], at_site[LORA_B], cfg.scale)
        if not cfg.use_dora:
            return y + branch.astype(y.dtype)
        kernel = unboxed(module.get_variable("params", "kernel")).astype(jnp.float32)
        if module.quantization is not None:
            kernel = kernel * unboxed(module.get_variable("params", "kernel_scale"))
        factor = dora_factor(kernel, at_site, cfg.scale)
        base = y.astype(jnp.float32) if dropped is x else dropped @ kernel
        return y + ((factor - 1.0) * base + factor * branch).astype(y.dtype)

    variables = {"params": params, COLLECTION: adapters}
    with nn.intercept_methods(interceptor):
        return model.apply(variables, *args, rngs=rngs, **kwargs)
