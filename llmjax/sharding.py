"""The device mesh (data, fsdp, tensor), and putting parameters and batches on it through the logical rules.

One way to shard, used everywhere: parameters carry logical axis names from their creation, the
rules table in :mod:`llmjax.axes` maps names to mesh axes, and :func:`init_sharded` builds state
directly into its shardings so no full copy ever lands on one device.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmjax import axes
from llmjax.config import ConfigError, MeshConfig

Rules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all global devices).

    One axis may be -1 (all remaining devices); ``MeshConfig.resolve`` checks the sizes. The
    fastest-varying axis (tensor) gets neighbouring devices, so tensor parallelism talks over the
    fastest links (``mesh_utils`` knows TPU/GPU topologies).
    """
    devices = list(devices) if devices is not None else jax.devices()
    mesh = MeshConfig(data, fsdp, tensor).resolve(len(devices), jax.process_count())
    shape = (mesh.data, mesh.fsdp, mesh.tensor)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)  # unknown topology: plain row-major order
    return Mesh(grid, axes.MESH_AXES)


def logical_to_sharding(logical_tree, mesh: Mesh, rules: Rules = axes.LOGICAL_AXIS_RULES):
    """Tree of logical ``PartitionSpec`` (e.g. from ``nn.get_partition_spec``) -> tree of ``NamedSharding``."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = axes.LOGICAL_AXIS_RULES) -> Iterator[None]:
    """Make ``mesh`` and the logical rules current, so ``nn.with_logical_constraint`` in models takes effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def init_sharded(init_fn: Callable, mesh: Mesh, *args, rules: Rules = axes.LOGICAL_AXIS_RULES):
    """Run ``init_fn(*args)`` so each output is created directly in its sharding; no full copy on one device.

    ``init_fn`` returns a pytree whose leaves may be boxed with logical axis names
    (``nn.LogicallyPartitioned``, as ``model.init`` returns) or plain arrays (replicated). Leaves derived
    from a boxed parameter with a different rank (Adafactor's factored row/column statistics, of size
    rows + cols) are replicated. Returns ``(state, shardings)``, both unboxed, with the same structure.
    """
    abstract = jax.eval_shape(init_fn, *args)
    boxed_shardings = _shardings_like(abstract, mesh, rules)
    with activate(mesh, rules):
        state = jax.jit(init_fn, out_shardings=boxed_shardings)(*args)
    return _unbox(state), _unbox(boxed_shardings)


def abstract_sharded(init_fn: Callable, mesh: Mesh, *args, rules: Rules = axes.LOGICAL_AXIS_RULES):
    """Shapes and shardings :func:`init_sharded` would produce, computing nothing (ahead-of-time planning)."""
    abstract = jax.eval_shape(init_fn, *args)
    return _unbox(abstract), _unbox(_shardings_like(abstract, mesh, rules))


def state_bytes_per_device(abstract_state, shardings) -> int:
    """Bytes of ``abstract_state`` (arrays or ``ShapeDtypeStruct``) held by each device under ``shardings``.

    Exact for even shardings (what :func:`init_sharded` checks); the largest shard is counted.
    """
    leaves, treedef = jax.tree.flatten(abstract_state)
    sharding_leaves = treedef.flatten_up_to(shardings)
    total = 0
    for leaf, sharding in zip(leaves, sharding_leaves):
        shard_shape = sharding.shard_shape(tuple(leaf.shape))
        total += math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
    return total


def batch_sharding(mesh: Mesh, rules: Rules = axes.LOGICAL_AXIS_RULES) -> NamedSharding:
    """Batch dimension split over the mesh axes the rules give ``act_batch`` (data, fsdp); the rest replicated."""
    spec = nn.logical_to_mesh_axes((axes.ACT_BATCH,), rules)
    return NamedSharding(mesh, spec)


def shard_batch(batch: dict, mesh: Mesh, rules: Rules = axes.LOGICAL_AXIS_RULES) -> dict:
    """Host numpy batch -> global ``jax.Array``s with the batch dimension sharded over (data, fsdp).

    ``batch`` holds this process's rows: process ``p`` of ``n`` feeds the contiguous block
    ``[p * local, (p + 1) * local)`` of the ``local * n``-row global batch (what ``DataIterator`` returns);
    on one process that is the whole batch. The global batch divides over the data-parallel devices
    (``RunConfig`` checks it against the mesh). The mesh must give each process's devices exactly its
    block (checked; true when processes own consecutive slots of the data/fsdp axes, as ``make_mesh`` lays out).
    """
    sharding = batch_sharding(mesh, rules)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        global_rows = value.shape[0] * jax.process_count()
        if jax.process_count() > 1:
            _check_process_rows(sharding, global_rows, value.shape[0])
        global_shape = (global_rows, *value.shape[1:])
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def _check_process_rows(sharding: NamedSharding, global_rows: int, local_rows: int) -> None:
    """This process's devices must hold exactly its block of rows, else its data would land on wrong rows."""
    held = set()
    for index in sharding.addressable_devices_indices_map((global_rows,)).values():
        held.update(range(global_rows)[index[0]])
    start = jax.process_index() * local_rows
    if held != set(range(start, start + local_rows)):
        raise ConfigError(
            f"process {jax.process_index()} feeds batch rows [{start}, {start + local_rows}) but the mesh "
            f"{dict(sharding.mesh.shape)} gives its devices {len(held)} rows from row {min(held)}; split the batch across "
            f"processes: make mesh.data*mesh.fsdp a multiple of the {jax.process_count()} processes"
        )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    auto_detect: bool = False,
) -> int:
    """Join a multi-process run; returns ``jax.process_count()``. Call before any other JAX use.

    Arguments win over the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``, ``JAX_LOCAL_DEVICE_IDS`` as "0,1"). With no coordinator anywhere, a single
    process stays single unless ``auto_detect`` asks JAX to discover a cluster (TPU pod, SLURM, Open MPI).
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if local_device_ids is None and env.get("JAX_LOCAL_DEVICE_IDS"):
        local_device_ids = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    if coordinator_address is None and not auto_detect:
        return 1
    if coordinator_address is not None and (num_processes is None or process_id is None) and not auto_detect:
        raise ConfigError("a coordinator address was given without num_processes and process_id; set "
                         "JAX_NUM_PROCESSES and JAX_PROCESS_ID (or pass them), or use auto_detect on a cluster")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    return jax.process_count()


# ----------------------------------------------------------------------------------------------------


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def _unbox(tree):
    return jax.tree.map(lambda x: x.value if _is_box(x) else x, tree, is_leaf=_is_box)


def _shardings_like(abstract, mesh: Mesh, rules: Rules):
    """Boxed abstract tree -> same-structured tree of NamedSharding, checked to divide evenly."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def for_box(path, box):
        names = box.names
        spec = nn.logical_to_mesh_axes(names, rules) if isinstance(box, nn.LogicallyPartitioned) \
            else PartitionSpec(*names)

        def for_leaf(leaf):
            if len(leaf.shape) != len(names):
                return replicated  # a statistic derived from the parameter with another rank
            sharding = NamedSharding(mesh, spec)
            _check_divisible(path, leaf.shape, names, sharding)
            return sharding

        return box.replace_boxed(jax.tree.map(for_leaf, box.value))

    return jax.tree_util.tree_map_with_path(
        lambda path, x: for_box(path, x) if _is_box(x) else replicated, abstract, is_leaf=_is_box)


def _check_divisible(path, shape, names, sharding: NamedSharding) -> None:
    for dim, (size, axis) in enumerate(zip(shape, sharding.spec)):
        parts = math.prod(sharding.mesh.shape[a] for a in _as_tuple(axis))
        if size % parts:
            raise ConfigError(
                f"{jax.tree_util.keystr(path)}: dimension {dim} (logical axis {names[dim]!r}) of size {size} "
                f"cannot be split "
                f"into {parts} shards over mesh axis {axis!r}; change the mesh (mesh.{_as_tuple(axis)[0]}) "
                f"or the model dimension so it divides evenly"
            )


def _as_tuple(axis) -> tuple[str, ...]:
    if axis is None:
        return ()
    return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
