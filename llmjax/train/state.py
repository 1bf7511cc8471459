"""TrainState: everything a training run carries from one step to the next.

The parameters are split in two pytrees with the same nesting as the model's
params: ``params`` holds only the trainable leaves, ``frozen_params`` the rest.
The optimizer is initialised on ``params`` alone, so a frozen base model (LoRA,
value-head-only, reward model on a frozen encoder, ...) never has optimizer
state. ``merge_params`` puts the two back together for the model call.

A trainable filter is a function ``(path) -> bool`` where ``path`` is the tuple
of dict keys leading to a leaf, e.g. ``("decoder", "layers_0", "attn", "q", "kernel")``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from llmjax.loading import merge_params  # noqa: F401 (re-exported; checkpoint reading needs it below train/)

Params = dict
TrainableFilter = Callable[[tuple[str, ...]], bool]


@flax.struct.dataclass
class TrainState:
    """The pytree a train step maps to the next one.

    step:           int32 scalar, number of steps taken (skipped ones included)
    params:         trainable leaves (fp32 master weights), nested dict
    frozen_params:  leaves that never change, same nesting, disjoint from ``params``
    opt_state:      optimizer state of ``params`` only
    rng:            uint32 ``[2]`` base key; a step uses ``fold_in(rng, step)``
    skipped_steps:  int32 scalar, updates discarded because loss/grads were not finite
    """

    step: jax.Array
    params: Params
    frozen_params: Params
    opt_state: optax.OptState
    rng: jax.Array
    skipped_steps: jax.Array

    def full_params(self) -> Params:
        """Trainable and frozen leaves merged into the model's param tree."""
        return merge_params(self.params, self.frozen_params)


def train_everything(path: tuple[str, ...]) -> bool:
    """The trainable filter of full training."""
    del path
    return True


def trainable_matching(*patterns: str) -> TrainableFilter:
    """Filter that trains the leaves whose ``/``-joined path matches any regex (``re.search``).

    ``trainable_matching(r"^decoder/", r"lm_head")`` trains the decoder and the output head.
    """
    if not patterns:
        raise ValueError("trainable_matching needs at least one regex; use train_everything to train all")
    compiled = [re.compile(p) for p in patterns]
    return lambda path: any(c.search("/".join(path)) for c in compiled)


def trainable_filter(trainable: tuple[str, ...] = (), frozen: tuple[str, ...] = ()) -> TrainableFilter:
    """The filter of ``train.trainable`` / ``train.frozen``: a leaf trains when its ``/``-joined path matches
    a ``trainable`` regex (any leaf when there are none) and no ``frozen`` regex (``re.search``)."""
    if not trainable and not frozen:
        return train_everything
    keep = trainable_matching(*trainable) if trainable else train_everything
    drop = [re.compile(p) for p in frozen]
    return lambda path: keep(path) and not any(c.search("/".join(path)) for c in drop)


def split_params(params: Params, is_trainable: TrainableFilter) -> tuple[Params, Params]:
    """Nested dict -> ``(trainable, frozen)`` nested dicts with the same nesting.

    Subtrees left empty by the split are dropped, so both halves are plain
    dicts holding only their own leaves.
    """

    def split(tree, prefix):
        trainable, frozen = {}, {}
        for key, value in tree.items():
            path = prefix + (str(key),)
            if isinstance(value, dict):
                t, f = split(value, path)
                if t:
                    trainable[key] = t
                if f:
                    frozen[key] = f
            elif is_trainable(path):
                trainable[key] = value
            else:
                frozen[key] = value
        return trainable, frozen

    if not isinstance(params, dict):
        raise TypeError(f"params must be a nested dict (got {type(params).__name__}); unbox flax variables first")
    return split(dict(params), ())


def create_train_state(
    params: Params, tx: optax.GradientTransformation, is_trainable: TrainableFilter, seed_or_key
) -> TrainState:
    """Split ``params``, initialise the optimizer on the trainable half only.

    Pure, so it can run under ``jax.jit(..., out_shardings=...)`` and the state is
    born sharded. ``seed_or_key``: int seed or a uint32 ``[2]`` key.
    """
    trainable, frozen = split_params(params, is_trainable)
    if not jax.tree_util.tree_leaves(trainable):
        raise ValueError("the trainable filter selected no parameters; nothing would be trained")
    rng = seed_or_key
    if not hasattr(rng, "shape") or rng.shape == ():
        rng = jax.random.PRNGKey(seed_or_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=trainable,
        frozen_params=frozen,
        opt_state=tx.init(trainable),
        rng=jnp.asarray(rng, jnp.uint32),
        skipped_steps=jnp.zeros((), jnp.int32),
    )


def count_params(tree: Any) -> int:
    """Number of scalar parameters in a pytree of arrays (or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))



InitTree = Callable[[jax.Array, "Params | None"], Params]


def model_init_tree(model) -> InitTree:
    """The init tree of a plain model: the base when there is one, else ``model.init`` (boxed params)."""
    from llmjax.models import dummy_inputs

    def init_tree(key, base):
        return base if base is not None else model.init(key, *dummy_inputs(model.config))["params"]

    return init_tree


def _base_boxes(model):
    """The model's params as ``nn.Partitioned`` boxes of ``ShapeDtypeStruct``s (logical axes, no compute)."""
    from llmjax.models import dummy_inputs

    return jax.eval_shape(lambda k: model.init(k, *dummy_inputs(model.config)), jax.random.PRNGKey(0))["params"]


def _box_values(boxes):
    """The boxes' values without ``nn.meta.unbox``, which adds sharding constraints under an active mesh."""
    return jax.tree_util.tree_map(lambda box: box.value, boxes, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _rebox(boxes, params):
    """Plain param arrays put back in the model's logical-axis boxes (so shardings follow them)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree_util.tree_map(lambda box, value: box.replace_boxed(value), boxes, params, is_leaf=is_box)


def _state_init_fn(model, tx: optax.GradientTransformation, is_trainable: TrainableFilter, init_tree: InitTree | None):
    """``(base | None, key) -> TrainState`` with every leaf boxed where its logical axes are known.

    The key splits into the tree's key and the state's key; ``init_tree(tree_key, boxed_base)`` builds
    the full tree (base plus whatever a stage adds), so a fresh init and a restore target (its
    ``eval_shape``) come from the same function.
    """
    init_tree = init_tree or model_init_tree(model)
    boxes = _base_boxes(model)

    def init_fn(base, key):
        tree_key, state_key = jax.random.split(key)
        tree = init_tree(tree_key, None if base is None else _rebox(boxes, base))
        return create_train_state(dict(tree), tx, is_trainable, state_key)

    return init_fn, boxes


def _check_params_match(params: Params, boxes) -> None:
    """Loaded params must have exactly the model's tree and shapes (clear error otherwise)."""
    expected = {
        "/".join(str(p.key) for p in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(_box_values(boxes))
    }
    given = {"/".join(str(p.key) for p in path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or extra:
        raise ValueError(f"initial params do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}; "
                         "check that the init checkpoint was made with the same model config")
    wrong = [(k, given[k], expected[k]) for k in expected if given[k] != expected[k]]
    if wrong:
        name, got, want = wrong[0]
        raise ValueError(f"initial param {name} has shape {got} but the model expects {want} "
                         f"({len(wrong)} mismatched); check the model config against the init checkpoint")


def init_train_state(model, tx, is_trainable: TrainableFilter, seed: int, mesh, params: Params | None = None,
                     init_tree: InitTree | None = None):
    """A TrainState born in its shardings on ``mesh``; returns ``(state, state_shardings)``.

    ``params``: the base weights (host arrays, the model's full tree, e.g. from ``init_from``), or None.
    ``init_tree``: ``(key, boxed base or None) -> full tree`` (default ``model_init_tree``: the base, or a
    random ``model.init`` from ``seed``). Loaded params are placed shard by shard, so no device ever holds
    a full copy; everything else is created directly in its shardings.
    """
    from llmjax import sharding

    init_fn, boxes = _state_init_fn(model, tx, is_trainable, init_tree)
    return sharding.init_sharded(init_fn, mesh, _place_base(params, boxes, mesh), jax.random.PRNGKey(seed))


def frozen_params_from_base(model, is_trainable: TrainableFilter, seed: int, mesh, params: Params | None,
                            init_tree: InitTree | None = None) -> Params:
    """Only the frozen half of the state ``init_train_state`` builds, in its shardings: what a resumed run
    whose checkpoints leave the frozen base out rebuilds from the base (the rest is never computed)."""
    from llmjax import sharding

    init_fn, boxes = _state_init_fn(model, optax.set_to_zero(), is_trainable, init_tree)
    frozen_fn = lambda base, key: init_fn(base, key).frozen_params  # noqa: E731 (jit drops the unused rest)
    frozen, _ = sharding.init_sharded(frozen_fn, mesh, _place_base(params, boxes, mesh), jax.random.PRNGKey(seed))
    return frozen


def place_model_params(model, params: Params, mesh) -> tuple[Params, Params]:
    """``model``'s params (host arrays, its full tree) on ``mesh``, each sharded by its logical axes, shard by
    shard; ``(arrays, shardings)``. For a second model a stage's loss reads (a distillation teacher)."""
    from llmjax import sharding

    boxes = _base_boxes(model)
    return _place_base(params, boxes, mesh), sharding.logical_to_sharding(nn.get_partition_spec(boxes), mesh)


def _place_base(params: Params | None, boxes, mesh):
    if params is None:
        return None
    from llmjax import sharding

    _check_params_match(params, boxes)
    return jax.device_put(params, sharding.logical_to_sharding(nn.get_partition_spec(boxes), mesh))


def abstract_train_state(model, tx, is_trainable: TrainableFilter, mesh, init_tree: InitTree | None = None,
                         has_base: bool = False) -> TrainState:
    """The TrainState ``init_train_state`` would build, as ``ShapeDtypeStruct``s carrying their
    shardings and computing nothing: the target to restore a checkpoint into. ``has_base``: the run
    starts from base weights (passed to ``init_tree``), as ``init_train_state(params=...)``."""
    from llmjax import sharding

    init_fn, boxes = _state_init_fn(model, tx, is_trainable, init_tree)
    base = _box_values(boxes) if has_base else None
    shapes, shardings = sharding.abstract_sharded(init_fn, mesh, base, jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
