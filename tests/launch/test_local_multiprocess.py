"""launch/local_multiprocess.sh: two JAX processes on this machine train like one process.

Two processes with 2 fake CPU devices each form one 4-device mesh; a single process with 4 fake
devices runs the same config on the same mesh shape. The data pipeline gives both runs the same
global batches and XLA reduces in the same order on the same mesh shape, so losses and final params
agree bitwise (the README's claim), not just to a tolerance.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax.train.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
# A 1-layer T5 on short span-corruption rows: the claim is about data and sharding, not model size.
OVERRIDES = [
    f"train.steps={STEPS}", "train.batch_size=8", "train.log_every_steps=1", "train.eval_every_steps=0",
    "train.export_hf=null", "optim.warmup_steps=1", f"checkpoint.every_steps={STEPS}", "checkpoint.async_save=false",
    "model.num_layers=1", "model.d_model=32", "model.d_kv=8", "model.d_ff=64", "model.num_heads=4",
    "data.encoder_length=32", "data.decoder_length=8", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from llmjax.data.bundled.corpus import generate_corpus
    from llmjax.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(generate_corpus(1000, 0), out, vocab_size=512)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    env.update(extra)
    return env


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, tokenizer_dir):
    config = REPO / "configs" / "pretrain_t5_tiny.yaml"
    common = [*OVERRIDES, f"data.tokenizer={tokenizer_dir}"]
    multi_out, single_out = tmp_path / "multi", tmp_path / "single"
    multi = subprocess.Popen(
        ["bash", str(REPO / "launch" / "local_multiprocess.sh"), str(config), *common,
         f"train.output_dir={multi_out}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_env(NUM_PROCESSES="2", DEVICES_PER_PROCESS="2", COORDINATOR_PORT=str(_free_port())),
    )
    single = subprocess.Popen(
        [sys.executable, "-m", "llmjax.cli", "train", "--config", str(config), *common,
         f"train.output_dir={single_out}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    )
    for process in (multi, single):
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
    logs = "".join(path.read_text() for path in sorted(tmp_path.glob("multiprocess_*.log")))
    assert logs.count(f'"step": {STEPS}') == 2, logs  # both processes finished every step

    multi_losses = [line["loss"] for line in _metrics(multi_out)]
    single_losses = [line["loss"] for line in _metrics(single_out)]
    assert len(multi_losses) == STEPS and multi_losses[-1] < multi_losses[0]
    assert multi_losses == single_losses  # exact: the metrics are written with full float precision

    a = jax.device_get(Checkpointer(multi_out / "checkpoints").restore_params(STEPS).state)
    b = jax.device_get(Checkpointer(single_out / "checkpoints").restore_params(STEPS).state)
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    differing = [i for i, (x, y) in enumerate(zip(leaves_a, leaves_b)) if x.tobytes() != y.tobytes()]
    worst = max(float(np.max(np.abs(x - y))) for x, y in zip(leaves_a, leaves_b))
    assert not differing, f"{len(differing)} of {len(leaves_a)} params differ after {STEPS} steps (max {worst:.3g})"
