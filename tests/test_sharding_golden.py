"""Golden sharding: the mesh axes every parameter class is split over, under an fsdp and a tensor mesh.

The tables below are written out by hand from the intended layout (fsdp splits the model width of every
matrix, tensor splits heads, MLP width and vocabulary; norms and relative-position tables are small and
replicated). A change to the rules in ``llmjax/axes.py`` or to a module's logical axes that would, for
example, silently replicate a weight fails here with the parameter named.

A spec lists, per dimension, the mesh axis of size > 1 that splits it (None: not split), so the same table
holds on any device count.
"""

import dataclasses
import re

import jax
import pytest

from llmjax import sharding
from llmjax.models import DecoderConfig, T5Config, build_model, logical_axes

F, T = "fsdp", "tensor"

# class -> (spec under fsdp=8, spec under tensor=8)
T5_ATTENTION = {
    "{side}/layers_*/{attn}/q/kernel": ((F, None), (None, T)),
    "{side}/layers_*/{attn}/k/kernel": ((F, None), (None, T)),
    "{side}/layers_*/{attn}/v/kernel": ((F, None), (None, T)),
    "{side}/layers_*/{attn}/o/kernel": ((None, F), (T, None)),
    "{side}/layers_*/{attn}_norm/scale": ((None,), (None,)),
}
T5_STACK = {
    "{side}/layers_*/mlp/wi_0/kernel": ((F, None), (None, T)),
    "{side}/layers_*/mlp/wi_1/kernel": ((F, None), (None, T)),
    "{side}/layers_*/mlp/wo/kernel": ((None, F), (T, None)),
    "{side}/layers_*/mlp_norm/scale": ((None,), (None,)),
    "{side}/final_norm/scale": ((None,), (None,)),
    "{side}/relative_position_bias/rel_embedding": ((None, None), (None, None)),
}


def _t5_golden(gated: bool, tied: bool) -> dict:
    table = {"shared/embedding": ((None, F), (T, None))}
    if not tied:
        table["lm_head/kernel"] = ((F, None), (None, T))
    for side in ("encoder", "decoder"):
        attns = ("self_attention", "cross_attention") if side == "decoder" else ("self_attention",)
        for attn in attns:
            table.update({k.format(side=side, attn=attn): v for k, v in T5_ATTENTION.items()})
        table.update({k.format(side=side): v for k, v in T5_STACK.items()})
        if not gated:
            for name in ("wi_0", "wi_1"):
                del table[f"{side}/layers_*/mlp/{name}/kernel"]
            table[f"{side}/layers_*/mlp/wi/kernel"] = ((F, None), (None, T))
    return table


DECODER_GOLDEN = {
    "embed/embedding": ((None, F), (T, None)),
    "layers_*/pre_attention_norm/scale": ((None,), (None,)),
    "layers_*/self_attention/q/kernel": ((F, None), (None, T)),
    "layers_*/self_attention/k/kernel": ((F, None), (None, T)),
    "layers_*/self_attention/v/kernel": ((F, None), (None, T)),
    "layers_*/self_attention/o/kernel": ((None, F), (T, None)),
    "layers_*/pre_mlp_norm/scale": ((None,), (None,)),
    "layers_*/mlp/wi_0/kernel": ((F, None), (None, T)),
    "layers_*/mlp/wi_1/kernel": ((F, None), (None, T)),
    "layers_*/mlp/wo/kernel": ((None, F), (T, None)),
    "final_norm/scale": ((None,), (None,)),
    "lm_head/kernel": ((F, None), (None, T)),
}

# Dimensions divisible by 8 everywhere, two layers per stack (so layer classes are really classes).
T5_GATED = T5Config(vocab_size=256, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_heads=8,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False)
T5_RELU = dataclasses.replace(T5_GATED, feed_forward_proj="relu", tie_word_embeddings=True)
DECODER = DecoderConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)

CASES = {
    "t5_v1_1": (T5_GATED, _t5_golden(gated=True, tied=False)),
    "t5_v1_0": (T5_RELU, _t5_golden(gated=False, tied=True)),
    "decoder": (DECODER, DECODER_GOLDEN),
}
MESHES = {"fsdp": (1, 8, 1), "tensor": (1, 1, 8)}


def _effective(spec, mesh) -> tuple:
    """A PartitionSpec with mesh axes of size 1 dropped: what actually splits each dimension."""
    out = []
    for entry in spec:
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(n for n in names if n is not None and mesh.shape[n] > 1)
        out.append(kept[0] if len(kept) == 1 else (kept or None))
    return tuple(out)


def _classes(config, mesh) -> dict:
    """Parameter class (``layers_<i>``, or the scanned ``layers``, -> ``layers_*``) -> effective spec.

    Unrolled layers are checked to be sharded alike; a scanned stack's leading layer axis is checked to be
    unsplit and dropped, so both layouts compare with the same table.
    """
    shardings = sharding.logical_to_sharding(logical_axes(build_model(config)), mesh)
    classes: dict = {}
    for path, named in jax.tree_util.tree_flatten_with_path(shardings)[0]:
        keys = [p.key for p in path]
        spec = _effective(named.spec, mesh)
        if "layers" in keys:
            assert spec[0] is None, f"{keys}: the scanned layer axis must not be split, got {spec}"
            spec = spec[1:]
        key = "/".join(re.sub(r"^layers(_\d+)?$", "layers_*", k) for k in keys)
        assert classes.setdefault(key, spec) == spec, f"{key}: layers are sharded differently"
    return classes


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_parameter_class_is_sharded_as_the_golden_table_says(case, mesh_name, scan):
    config, golden = CASES[case]
    config = dataclasses.replace(config, scan_layers=scan)
    mesh = sharding.make_mesh(*MESHES[mesh_name])
    which = sorted(MESHES).index(mesh_name)  # fsdp -> 0, tensor -> 1
    expected = {name: specs[which] for name, specs in golden.items()}
    assert _classes(config, mesh) == expected


@pytest.mark.parametrize("config_file", ["decoder_7b.yaml", "t5_xxl.yaml"])
def test_pure_fsdp_spreads_params_and_adamw_state_evenly(config_file):
    """Under fsdp=8 each device holds at most 1.15 x its even share of the 7B / XXL train state.

    Only shapes are built (``jax.eval_shape``): nothing is allocated. The excess over 1.00 is what the
    table above replicates on purpose (norm scales, relative-position tables).
    """
    from llmjax.config import CONFIGS_DIR, OptimConfig, load_section
    from llmjax.train.optim import make_optimizer
    from llmjax.train.state import abstract_train_state, train_everything

    model = build_model(load_section(CONFIGS_DIR / "model" / config_file, "model"))
    tx, _ = make_optimizer(OptimConfig(name="adamw"), total_steps=10)
    mesh = sharding.make_mesh(1, 8, 1)
    state = abstract_train_state(model, tx, train_everything, mesh)
    parts = (state.params, state.opt_state)
    per_device = sum(sharding.state_bytes_per_device(p, jax.tree.map(lambda s: s.sharding, p)) for p in parts)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(parts))
    assert total > 50e9  # fp32 params + two AdamW moments of a multi-billion-parameter model
    assert per_device <= 1.15 * total / 8
