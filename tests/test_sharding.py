import functools
import math
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import axes
from llmjax.config import ConfigError, OptimConfig
from llmjax.models import DecoderConfig, T5Config, build_model, dummy_inputs, init_params
from llmjax.models.layers import Dense
from llmjax.sharding import (
    abstract_sharded,
    activate,
    init_sharded,
    initialize_distributed,
    make_mesh,
    shard_batch,
    state_bytes_per_device,
)
from llmjax.train.optim import make_optimizer

# One layer per stack: every kind of parameter, and seconds (not minutes) of compilation on 8 fake devices.
T5_TINY = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
DECODER_TINY = DecoderConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
MESHES = [(2, 1, 4), (1, 8, 1), (2, 2, 2)]


def test_make_mesh_checks_its_shape_through_mesh_config():
    with pytest.raises(ConfigError, match=r"data\*fsdp\*tensor = 2\*2\*1 = 4 but there are 8 devices"):
        make_mesh(2, 2, 1)
    with pytest.raises(ConfigError, match="only one mesh axis may be -1"):
        make_mesh(-1, -1, 1)


def test_make_mesh_uses_all_devices():
    mesh = make_mesh(2, -1, 1)
    assert mesh.axis_names == axes.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert make_mesh(1, 1, 1, devices=jax.devices()[:1]).size == 1


def _inputs(config, batch=8, length=8):
    rng = np.random.default_rng(0)
    ids = rng.integers(2, config.vocab_size, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, 5:] = 0  # some padding
    if isinstance(config, T5Config):
        return {"input_ids": ids, "decoder_input_ids": np.roll(ids, 1, axis=1), "attention_mask": mask,
                "decoder_attention_mask": np.ones_like(mask)}
    return {"input_ids": ids, "attention_mask": mask}


@functools.cache
def _single_device_reference(config):
    model = build_model(config)
    params = init_params(model, jax.random.key(0))
    return params, jax.jit(_forward(model))(params, _inputs(config))


def _forward(model):
    def apply(params, batch):
        if isinstance(model.config, T5Config):
            return model.apply({"params": params}, batch["input_ids"], batch["decoder_input_ids"],
                               attention_mask=batch["attention_mask"],
                               decoder_attention_mask=batch["decoder_attention_mask"])
        return model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"])
    return apply


@pytest.mark.parametrize("config", [T5_TINY, DECODER_TINY], ids=["t5", "decoder"])
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_logits_match_single_device(config, mesh_shape):
    model = build_model(config)
    rng = jax.random.key(0)
    batch = _inputs(config)
    reference_params, reference = _single_device_reference(config)

    mesh = make_mesh(*mesh_shape)
    params, shardings = init_sharded(lambda r: model.init(r, *dummy_inputs(config))["params"], mesh, rng)
    # Born sharded, with the values of a single-device init (partitionable RNG; jit may round 1 ulp apart).
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=3e-7, atol=1e-8)
    with activate(mesh):
        logits = jax.jit(_forward(model), in_shardings=(shardings, None))(params, shard_batch(batch, mesh))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), atol=1e-5, rtol=1e-5)
    assert logits.sharding.shard_shape(logits.shape)[0] == 8 // (mesh_shape[0] * mesh_shape[1])

    # Parameters are really split: every matrix with a sharded logical axis holds only its part.
    data, fsdp, tensor = mesh_shape
    expected_parts = {axes.EMBED: fsdp, axes.MLP: tensor, axes.HEADS: tensor, axes.KV_HEADS: tensor,
                      axes.VOCAB: tensor}
    logical = nn.get_partition_spec(jax.eval_shape(lambda r: model.init(r, *dummy_inputs(config)), rng))["params"]
    checked = 0
    for leaf, names in zip(jax.tree.leaves(params), jax.tree.leaves(logical, is_leaf=lambda x: isinstance(
            x, jax.sharding.PartitionSpec))):
        want = tuple(size // expected_parts.get(name, 1) for size, name in zip(leaf.shape, names))
        assert {tuple(s.data.shape) for s in leaf.addressable_shards} == {want}, (names, leaf.shape)
        checked += want != leaf.shape
    assert checked > 0


def test_state_bytes_per_device_matches_real_shards():
    model = build_model(DECODER_TINY)
    mesh = make_mesh(2, 2, 2)
    tx, _ = make_optimizer(OptimConfig(), 10)

    def init_state(rng):
        params = model.init(rng, *dummy_inputs(DECODER_TINY))["params"]
        return {"params": params, "opt_state": tx.init(params)}

    abstract, abstract_shardings = abstract_sharded(init_state, mesh, jax.random.key(0))
    predicted = state_bytes_per_device(abstract, abstract_shardings)
    state, shardings = init_sharded(init_state, mesh, jax.random.key(0))
    device = jax.devices()[0]
    measured = sum(s.data.nbytes for leaf in jax.tree.leaves(state) for s in leaf.addressable_shards
                   if s.device == device)
    assert predicted == measured
    full = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    assert full / 8 < predicted < full / 2  # mostly split 8-ways (norms, counters replicated)
    # AdamW moments are sharded like their parameters. The optimizer splits them into groups (the
    # scanned layer stack, the rest: llmjax.train.optim.per_layer); together the groups cover every param.
    def specs(tree):
        return {jax.tree_util.keystr(path): s.spec for path, s in jax.tree_util.tree_leaves_with_path(tree)}

    mu_specs = {}
    for group in shardings["opt_state"][1].inner_states.values():
        mu_specs.update(specs(group.inner_state[0].mu))
    assert mu_specs == specs(shardings["params"])
    assert any(spec[0] is None and len(spec) == 3 for spec in mu_specs.values())  # stacked [layers, in, out]


class _Wide(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return Dense(self.features, (axes.EMBED, axes.MLP))(x)


def test_adafactor_factored_statistics_are_replicated_and_params_sharded():
    module = _Wide(256)
    mesh = make_mesh(1, 4, 2)
    tx, _ = make_optimizer(OptimConfig(name="adafactor"), 10)

    def init_state(rng):
        params = module.init(rng, jnp.ones((1, 128)))["params"]
        return params, tx.init(params)

    (params, opt_state), _ = init_sharded(init_state, mesh, jax.random.key(0))
    assert params["Dense_0"]["kernel"].addressable_shards[0].data.shape == (32, 128)
    factored = [x for x in jax.tree.leaves(opt_state) if x.ndim == 1 and x.shape[0] in (128, 256)]
    assert len(factored) == 2 and all(x.sharding.is_fully_replicated for x in factored)


def test_indivisible_parameter_names_it():
    mesh = make_mesh(1, 2, 4)
    with pytest.raises(ConfigError, match=r"\['Dense_0'\]\['kernel'\]: dimension 1 \(logical axis 'mlp'\) of "
                                         r"size 6 cannot be split into 4 shards over mesh axis 'tensor'"):
        init_sharded(lambda r: _Wide(6).init(r, jnp.ones((1, 8)))["params"], mesh, jax.random.key(0))


def test_shard_batch():
    mesh = make_mesh(2, 2, 2)
    batch = {"decoder_input_tokens": np.arange(32, dtype=np.int32).reshape(8, 4)}
    out = shard_batch(batch, mesh)["decoder_input_tokens"]
    np.testing.assert_array_equal(np.asarray(out), batch["decoder_input_tokens"])
    assert {tuple(s.data.shape) for s in out.addressable_shards} == {(2, 4)}  # 8 rows over data*fsdp = 4
    # the two tensor-parallel devices of one (data, fsdp) slot hold the same rows
    rows = {s.device.id: s.index[0] for s in out.addressable_shards}
    assert len(set(map(str, rows.values()))) == 4


def test_shard_batch_refuses_a_mesh_that_does_not_split_rows_by_process(monkeypatch):
    # As process 0 of 2 it feeds rows [0, 4) of 8, but all 8 devices (here all addressable) hold all rows.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"process 0 feeds batch rows \[0, 4\) but the mesh .* gives its devices "
                                         r"8 rows from row 0; .*multiple of the 2 processes"):
        shard_batch({"decoder_input_tokens": np.zeros((4, 3), np.int32)}, make_mesh(2, 2, 2))


def test_initialize_distributed_single_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed() == 1
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    with pytest.raises(ConfigError, match="without num_processes and process_id"):
        initialize_distributed()


def test_param_count_helper_consistency():
    # abstract_sharded computes nothing but reports the same shapes as a real init.
    model = build_model(DECODER_TINY)
    abstract, _ = abstract_sharded(lambda r: model.init(r, *dummy_inputs(DECODER_TINY))["params"],
                                   make_mesh(1, 8, 1), jax.random.key(0))
    real = init_params(model, jax.random.key(0))
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, real)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) == \
        sum(x.size for x in jax.tree.leaves(real))


_WORKER = """
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
import numpy as np
from llmjax.sharding import initialize_distributed, make_mesh, shard_batch
processes = initialize_distributed()
rows = shard_batch({"x": np.full((2, 3), jax.process_index() + 1, np.int32)}, make_mesh(-1, 1, 1))["x"]
print("RESULT", processes, len(jax.devices()), rows.shape, int(jax.jit(lambda a: a.sum())(rows)))
"""


@pytest.mark.slow
def test_two_processes_share_one_global_batch(tmp_path):
    # Two local processes with 2 CPU devices each = one 4-device mesh; each feeds its own 2 rows.
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    for pid in range(2):
        env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
        # 2 processes, 4 global devices, a (4, 3) global batch summing 6 * 1 + 6 * 2.
        assert "RESULT 2 4 (4, 3) 18" in out, out
