"""The layer stack of both families: remat policies, the layers as one ``nn.scan``, and the two param layouts.

With ``scan_layers`` a stack's ``N`` identical layers are one ``nn.scan`` over a single layer module:
XLA compiles the layer once, so compile time does not grow with depth, and the parameters (and the KV
cache) are stacked: ``layers/<same path as one layer>`` with a leading ``[N, ...]`` axis whose logical
name is ``axes.LAYERS``. Without it the stack is a Python loop over ``layers_0 .. layers_{N-1}``.

:func:`stack_layers` / :func:`unstack_layers` convert a parameter tree between the two layouts; the
Hugging Face mapping works on the unscanned one, and the same functions move a checkpoint between a
scanned and an unscanned config.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax import axes
from llmjax.model_config import REMAT_POLICY_NAMES, family_of

# Policy name -> ``jax.checkpoint`` policy (None: save nothing, recompute the whole layer).
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert set(REMAT_POLICIES) | {"none"} == set(REMAT_POLICY_NAMES)


def layer_stack(layer_cls: type[nn.Module], layer_args: tuple, config, num_layers: int, x: jax.Array,
                broadcast: tuple, static: tuple, rematerialize: bool) -> jax.Array:
    """Run ``num_layers`` layers ``layer_cls(*layer_args)`` over ``x``; call inside a compact method.

    Each layer is called ``layer(x, *broadcast, *static) -> x``: ``broadcast`` are arrays (or None)
    every layer sees unchanged (masks, biases, positions, encoder outputs, cache index), ``static``
    are Python values (``deterministic``, ``decode``). ``config.remat_policy`` wraps the layer in
    ``nn.remat`` when ``rematerialize`` (pass False when no gradient is taken, e.g. when decoding).
    Param and cache paths: ``layers/...`` (stacked) with ``config.scan_layers``, else ``layers_{i}/...``.
    """
    if rematerialize and config.remat_policy != "none":
        # nn.remat counts ``self`` as argument 0; the static values are the last arguments.
        first_static = 2 + len(broadcast)
        layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers,
                             static_argnums=tuple(range(first_static, first_static + len(static))))
    if not config.scan_layers:
        for i in range(num_layers):
            x = layer_cls(*layer_args, name=f"layers_{i}")(x, *broadcast, *static)
        return x

    def body(layer, carry, *inputs):
        return layer(carry, *inputs, *static), None

    scanned = nn.scan(
        body,
        # "lora": LoRA adapters passed as a variable collection (llmjax.lora.apply_factored), stacked like params.
        variable_axes={"params": 0, "cache": 0, "lora": 0},
        split_rngs={"params": True, "dropout": True},  # each layer its own init and dropout masks
        in_axes=(nn.broadcast,) * len(broadcast),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: axes.LAYERS},
    )
    x, _ = scanned(layer_cls(*layer_args, name="layers"), x, *broadcast)
    return x


# ----------------------------------------------------------------------------------------------------
# The two parameter layouts


def _stack_roots(config) -> list[tuple[tuple[str, ...], int]]:
    """``(path of the dict holding the layers, number of layers)`` for each stack of the family (see STACKS)."""
    if family_of(config) == "t5":
        return [(("encoder",), config.num_layers), (("decoder",), config.decoder_layers)]
    return [((), config.num_hidden_layers)]


def _subtree(tree: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def _copy_path(tree: dict, path: tuple[str, ...]) -> tuple[dict, dict]:
    """A shallow copy of ``tree`` with fresh dicts along ``path``; -> (new tree, the dict at ``path``)."""
    root = node = dict(tree)
    for key in path:
        node[key] = dict(node[key])
        node = node[key]
    return root, node


def _stack(leaves):
    xp = np if all(isinstance(leaf, np.ndarray) for leaf in leaves) else jnp
    return xp.stack(leaves)


def stack_layers(params: dict, config) -> dict:
    """Unscanned tree (``layers_0 .. layers_{N-1}``) -> scanned tree (``layers``, leaves ``[N, ...]``).

    Works on any tree with the model's layer paths (params, LoRA adapters, gradients); numpy leaves
    stay numpy (host memory), other arrays are stacked with ``jnp``. Other entries are shared, not copied.
    """
    out = params
    for path, count in _stack_roots(config):
        out, node = _copy_path(out, path)
        names = [f"layers_{i}" for i in range(count)]
        missing = [name for name in names if name not in node]
        if missing or "layers" in node:
            where = "/".join(path) or "the top level"
            found = sorted(k for k in node if k.startswith("layers"))
            raise ValueError(f"stack_layers: expected {names[0]}..{names[-1]} under {where} (an unscanned tree "
                             f"of {count} layers), found {found}")
        node["layers"] = jax.tree_util.tree_map(lambda *leaves: _stack(leaves), *[node.pop(n) for n in names])
    return out


def unstack_layers(params: dict, config) -> dict:
    """Scanned tree (``layers`` with a leading ``[N, ...]`` axis) -> unscanned tree (``layers_{i}``)."""
    out = params
    for path, count in _stack_roots(config):
        out, node = _copy_path(out, path)
        if "layers" not in node:
            where = "/".join(path) or "the top level"
            raise ValueError(f"unstack_layers: no 'layers' under {where}; found {sorted(node)} "
                             "(is the tree already unscanned?)")
        stacked = node.pop("layers")
        lengths = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(stacked)}
        if lengths != {count}:
            raise ValueError(f"unstack_layers: the config has {count} layers but the stacked leaves have leading "
                             f"axes {sorted(lengths)}")
        for i in range(count):
            node[f"layers_{i}"] = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], stacked)
    return out


def to_layout(params: dict, source_config, target_config) -> dict:
    """``params`` of a model with ``source_config`` in the layer layout of ``target_config`` (the same
    weights; unchanged when both have the same ``scan_layers``)."""
    if source_config.scan_layers == target_config.scan_layers:
        return params
    return stack_layers(params, source_config) if target_config.scan_layers else unstack_layers(params, source_config)


# Where scanned stacks sit in the param trees of all families (the ``layers`` entries).
STACKS = ("layers", "encoder/layers", "decoder/layers")


def stack_of(path) -> str | None:
    """The entry of :data:`STACKS` holding the leaf at ``path`` (a jax key path), or None if not in a stack.

    Leaves of a stack have a leading layer axis. A tree that nests the model's params under a part of its
    own (a LoRA run's adapters, ``lora/encoder/layers/...``) names the same stack.
    """
    keys = [str(getattr(key, "key", key)) for key in path]
    if "layers" not in keys:
        return None
    index = keys.index("layers")
    return "/".join(keys[index - 1: index + 1]) if index and keys[index - 1] in ("encoder", "decoder") else "layers"


def cache_batch_axis(config) -> int:
    """The batch axis of every KV-cache leaf: 1 when the cache is stacked over layers, else 0."""
    return 1 if config.scan_layers else 0
