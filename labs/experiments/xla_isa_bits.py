r"""Do XLA's CPU vector instructions change a computation's bits? (Why a run repeats on one processor, not another.)

The lab's instruction-tuned base, built by the same code and seed on an Intel Xeon and on an AMD EPYC, came out
different (``labs/experiments/README.md``). This script computes a few of a training step's operations on fixed
random inputs (a matmul, a sum, tanh, exp, softmax, and a whole small T5 training step: loss and gradient norm) under
each ``--xla_cpu_max_isa`` this processor allows, each in a fresh process (XLA reads ``XLA_FLAGS`` once), and prints
a short hash of each output's bytes. Equal hashes are equal bits. Run on two machines, the rows with the same ISA
say whether pinning XLA's ISA (``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` on both) makes them compute alike.

    .venv/bin/python labs/experiments/xla_isa_bits.py > labs/experiments/xla_isa_bits/<machine>.txt
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ISAS = ("default", "SSE4_2", "AVX", "AVX2", "AVX512")
# What each ISA needs from /proc/cpuinfo's flags (XLA falls back silently to what the processor has).
NEEDS = {"SSE4_2": "sse4_2", "AVX": "avx", "AVX2": "avx2", "AVX512": "avx512f"}


def _digest(array) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(np.asarray(array)).tobytes()).hexdigest()[:12]


def hashes() -> dict[str, str]:
    """Each operation's output hash in this process (its XLA_FLAGS as set)."""
    import jax
    import jax.numpy as jnp

    from llmjax.models import build_model, init_params
    from llmjax.models.t5 import T5Config
    from llmjax.train.lm_loss import lm_loss_fn

    a = jax.random.normal(jax.random.PRNGKey(0), (512, 512))
    b = jax.random.normal(jax.random.PRNGKey(1), (512, 512))
    ops = {"matmul": lambda: a @ b, "sum": lambda: a.sum(axis=0), "tanh": lambda: jnp.tanh(a),
           "exp": lambda: jnp.exp(a), "softmax": lambda: jax.nn.softmax(a, axis=-1)}
    out = {name: _digest(jax.jit(op)()) for name, op in ops.items()}

    config = T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model = build_model(config)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 33), 1, 256)
    batch = {"encoder_input_tokens": tokens[:, :32], "decoder_input_tokens": tokens[:, :16],
             "decoder_target_tokens": tokens[:, 1:17], "decoder_loss_weights": jnp.ones((4, 16), jnp.float32)}
    params = init_params(model, jax.random.PRNGKey(3))
    loss_fn = lm_loss_fn(model)

    def loss(p):
        return loss_fn(p, batch, None)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    norm = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree_util.tree_leaves(grads)))
    out["t5 loss"] = f"{_digest(value)} ({float(value):.9g})"
    out["t5 grad norm"] = f"{_digest(norm)} ({float(norm):.9g})"
    return out


def main() -> None:
    if os.environ.get("LLMJAX_ISA_CHILD"):
        for name, digest in hashes().items():
            print(f"{name}\t{digest}")
        return
    sys.path.insert(0, str(ROOT))
    from llmjax import environment

    simd = set(environment.vector_extensions())
    print(f"# {environment.one_line()}")
    print("| XLA_FLAGS | " + " | ".join(["matmul", "sum", "tanh", "exp", "softmax", "t5 loss", "t5 grad norm"]) + " |")
    print("|---|" + "---|" * 7)
    for isa in ISAS:
        if isa != "default" and NEEDS[isa] not in simd:
            print(f"| --xla_cpu_max_isa={isa} | (this processor lacks {NEEDS[isa]}) |")
            continue
        flags = "" if isa == "default" else f"--xla_cpu_max_isa={isa}"
        env = {**os.environ, "LLMJAX_ISA_CHILD": "1", "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT),
               "JAX_PLATFORMS": "cpu"}
        run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, check=True)
        row = dict(line.split("\t") for line in run.stdout.splitlines())
        print(f"| {flags or '(none)'} | " + " | ".join(row.values()) + " |")


if __name__ == "__main__":
    main()
