"""Mixed precision as llmjax/models/layers.py promises it: with ``dtype="bfloat16"`` the matmuls really run
in bf16, while norm statistics, attention softmax and logits stay fp32.

Read off the traced program (every primitive with its operand dtypes), so a cast dropped anywhere shows
up. That bf16 moves the logits by a bf16-sized amount (no more, no less) is checked in test_t5.py and
test_decoder.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr

from llmjax.models import build_model, init_params
from tests.train.helpers import TINY


def _equations(jaxpr):
    """Every equation of a jaxpr, descending into the jaxprs nested in jit, custom_jvp, scan, ... calls."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    yield from _equations(sub)


def _operand_dtypes(jaxpr, primitive):
    """The dtypes of the floating-point operands of each ``primitive`` equation."""
    return [
        tuple(str(v.aval.dtype) for v in eqn.invars if jnp.issubdtype(v.aval.dtype, jnp.floating))
        for eqn in _equations(jaxpr) if eqn.primitive.name == primitive
    ]


def _inputs(family):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 128, (2, 12)).astype(np.int32)
    return (ids, ids[:, :10]) if family == "t5" else (ids,)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_bf16_model_multiplies_in_bf16_and_keeps_softmax_norms_logits_fp32(family, scan):
    config = dataclasses.replace(TINY[family], scan_layers=scan)
    model16 = build_model(dataclasses.replace(config, dtype="bfloat16"))
    # Tracing needs only shapes: abstract fp32 params, nothing is initialized or compiled.
    params = jax.eval_shape(lambda: init_params(build_model(config), jax.random.key(0)))
    jaxpr = jax.make_jaxpr(lambda p: model16.apply({"params": p}, *_inputs(family)))(params).jaxpr
    # A scanned stack traces its layer body once; unrolled, every layer appears.
    num_layers = 1 if scan else (config.num_layers if family == "t5" else config.num_hidden_layers)

    matmuls = _operand_dtypes(jaxpr, "dot_general")
    assert matmuls and all(dtypes == ("bfloat16", "bfloat16") for dtypes in matmuls), matmuls
    # Softmax: exp(logits - max) / sum, one per attention (T5: encoder self, decoder self and cross).
    attentions = 3 * num_layers if family == "t5" else num_layers
    exps = _operand_dtypes(jaxpr, "exp")
    assert len(exps) == attentions and all(dtypes == ("float32",) for dtypes in exps), exps
    assert all(dtypes == ("float32",) for dtypes in _operand_dtypes(jaxpr, "reduce_max")), "softmax max"
    # RMSNorm: mean of squares (a reduce_sum, as is the softmax denominator) and rsqrt, one per norm.
    norms = (2 * num_layers + 1) + (3 * num_layers + 1) if family == "t5" else 2 * num_layers + 1
    rsqrts = _operand_dtypes(jaxpr, "rsqrt")
    assert len(rsqrts) == norms and all(dtypes == ("float32",) for dtypes in rsqrts), rsqrts
    sums = _operand_dtypes(jaxpr, "reduce_sum")
    assert len(sums) >= norms + attentions and all(dtypes == ("float32",) for dtypes in sums), sums
    assert [str(v.aval.dtype) for v in jaxpr.outvars] == ["float32"]  # logits
