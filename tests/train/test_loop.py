"""The loop: exact resume, SIGTERM/SIGKILL, NaN policy both ways, metrics and progress outputs.

In-process tests drive ``train`` with a tiny decoder on synthetic token documents. The
subprocess tests (marked slow) run the real CLI on the bundled corpus and signal it.
"""

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax.config import CheckpointConfig, ConfigError, DataConfig, MeshConfig, OptimConfig, RunConfig, TrainConfig
from llmjax.data.objectives import causal_lm_example
from llmjax.data.sources import DataIterator
from llmjax.models import build_model
from llmjax.train.checkpoint import Checkpointer
from llmjax.train.loop import NonFiniteLossError, Stage, train
from llmjax.train.lm_loss import lm_loss_fn
from tests.train.helpers import TINY

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [{"ids": list(np.random.default_rng(i).integers(3, 128, 5 + i % 23))} for i in range(200)]


def _config(tmp_path, steps=6, **train):
    return RunConfig(
        model=TINY["decoder"],
        data=DataConfig(objective="causal_lm", decoder_length=16, tokenizer_vocab_size=128),
        train=TrainConfig(**{"steps": steps, "batch_size": 8, "log_every_steps": 1, "output_dir": str(tmp_path / "out"),
                             **train}),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
        checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=2, keep=None, async_save=False),
        mesh=MeshConfig(data=2, fsdp=2, tensor=2),
    )


class _Recording:
    """Wraps the data iterator: records what each step consumed; optional hooks by batch number."""

    def __init__(self, iterator, hooks=None):
        self.iterator, self.hooks, self.seen = iterator, hooks or {}, []

    def __next__(self):
        batch = next(self.iterator)
        self.seen.append(hashlib.sha256(batch["decoder_input_tokens"].tobytes()).hexdigest())
        hook = self.hooks.get(len(self.seen))
        return hook(batch) if hook else batch

    def state(self):
        return self.iterator.state()

    def restore(self, state):
        self.iterator.restore(state)

    def stats(self):
        return self.iterator.stats()


def _stage(hooks=None):
    model = build_model(TINY["decoder"])

    def example_fn(raw, rng):
        del rng
        ids = np.asarray(raw["ids"], np.int32)
        return [causal_lm_example(ids[i:i + 17]) for i in range(0, len(ids) - 1, 16)]

    data = DataIterator(DOCUMENTS, example_fn, batch_size=8, decoder_length=16, seed=0)
    return Stage(name="test", model=model, loss_fn=lm_loss_fn(model), train_data=_Recording(data, hooks))


def _final_params(config):
    return jax.device_get(Checkpointer(config.checkpoint_dir).restore_params().state)


def _bitwise_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _sigterm(batch):
    os.kill(os.getpid(), signal.SIGTERM)
    return batch


def test_interrupted_then_resumed_run_equals_uninterrupted_bitwise(tmp_path):
    whole_config = _config(tmp_path / "whole")
    whole_stage = _stage()
    summary = train(whole_stage, whole_config, progress=False, peak_flops_per_sec=1e9)
    assert summary["step"] == 6 and summary["interrupted"] is None

    config = _config(tmp_path / "parts")
    first = _stage(hooks={3: _sigterm})  # SIGTERM arrives while step 3 runs
    summary = train(first, config, progress=False, peak_flops_per_sec=1e9)
    assert summary["interrupted"] == "SIGTERM" and summary["step"] == 3
    assert Checkpointer(config.checkpoint_dir).all_steps() == [2, 3]  # periodic + the one saved on SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop gave the handler back

    second = _stage()
    summary = train(second, config, progress=False, peak_flops_per_sec=1e9)
    assert summary["start_step"] == 3 and summary["step"] == 6
    assert first.train_data.seen + second.train_data.seen == whole_stage.train_data.seen  # same data order
    assert _bitwise_equal(_final_params(config), _final_params(whole_config))

    lines = [json.loads(line) for line in (tmp_path / "parts" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "z_loss", "learning_rate", "grad_norm", "tokens"):
        assert all(np.isfinite(line[key]) for line in lines), key
    assert "tokens_per_sec" in lines[-1] and 0 < lines[-1]["mfu"]
    # the data's own counters ride along: examples batched by this (resumed) iterator, none cut to the row
    assert lines[-1]["data_examples"] > 0 and lines[-1]["data_truncated_decoder_examples"] == 0
    assert any((tmp_path / "parts" / "out" / "tensorboard").iterdir())
    # Each start and resume says where it ran, and each checkpoint what wrote it.
    starts = [json.loads(line) for line in (tmp_path / "parts" / "out" / "environment.jsonl").read_text().splitlines()]
    assert [s["start_step"] for s in starts] == [0, 3]
    assert all(s["versions"]["jax"] == jax.__version__ and s["devices"] == {"cpu": jax.device_count()} for s in starts)
    assert Checkpointer(config.checkpoint_dir).restore_params().meta["environment"]["cpu"] == starts[1]["cpu"]


def test_existing_checkpoints_without_resume_is_a_clear_error(tmp_path):
    # The same config as the other tests here: the same compiled step (the schedule's step count is in it).
    train(_stage(), _config(tmp_path), progress=False, peak_flops_per_sec=1e9)
    with pytest.raises(ConfigError, match=r"already has checkpoints \(newest step 6\) and train.resume=false"):
        train(_stage(), _config(tmp_path, steps=7, resume=False), progress=False, peak_flops_per_sec=1e9)
    assert len((tmp_path / "out" / "environment.jsonl").read_text().splitlines()) == 1  # the refused start wrote none


def test_resume_from_a_corrupt_newest_checkpoint_uses_the_previous_one_with_a_note(tmp_path, capsys):
    config = _config(tmp_path)
    train(_stage(), config, progress=False, peak_flops_per_sec=1e9)
    final = _final_params(config)
    newest = Path(config.checkpoint_dir) / "6"
    victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a save cut short
    capsys.readouterr()

    with pytest.warns(UserWarning, match="falling back to the previous checkpoint"):
        summary = train(_stage(), config, progress=False, peak_flops_per_sec=1e9)
    out = capsys.readouterr().out
    assert re.search(r"skipped unusable checkpoint: checkpoint step 6 at .* is truncated or corrupted", out), out
    assert "resumed from step 4" in out
    assert summary["start_step"] == 4 and summary["step"] == 6
    assert (Path(config.checkpoint_dir) / "corrupt" / "6").is_dir()  # moved aside, then step 6 saved afresh
    assert Checkpointer(config.checkpoint_dir).all_steps() == [2, 4, 6]
    assert _bitwise_equal(_final_params(config), final)  # steps 5 and 6 redone exactly


def _poison(batch):
    weights = batch["decoder_loss_weights"].astype(np.float32)
    weights[0, 0] = np.nan
    return dict(batch, decoder_loss_weights=weights)


def test_nan_policy_abort_stops_with_the_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 .*train.nan_policy=skip"):
        train(_stage(hooks={3: _poison}), _config(tmp_path), progress=False, peak_flops_per_sec=1e9)


@pytest.mark.parametrize("nan_step", [3, 4])
def test_nan_policy_abort_between_logging_steps_names_the_step_and_saves_nothing_after_it(tmp_path, nan_step):
    # Logging every 5 steps: steps 3 and 4 are read only by the deferred check (a step's metrics are read
    # after the next step is dispatched, or before a checkpoint is saved). Step 4 is a checkpoint step: its
    # state must not be saved, or a resume would carry on past the bad batch as if the run had not aborted.
    config = _config(tmp_path, log_every_steps=5)
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss at step {nan_step} "):
        train(_stage(hooks={nan_step: _poison}), config, progress=False, peak_flops_per_sec=1e9)
    assert Checkpointer(config.checkpoint_dir).all_steps() == [2]
    assert not (tmp_path / "out" / "metrics.jsonl").read_text().strip()  # no logging step was reached


def test_nan_policy_skip_discards_the_update_and_logs_it(tmp_path, capsys):
    summary = train(_stage(hooks={3: _poison}), _config(tmp_path, nan_policy="skip"), progress=False,
                    peak_flops_per_sec=1e9)
    assert summary["step"] == 6 and summary["skipped_steps"] == 1
    assert "step 3: non-finite loss" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [line["finite"] for line in lines] == [1, 1, 0, 1, 1, 1]
    assert lines[-1]["skipped_steps"] == 1 and np.isfinite(lines[-1]["loss"])


# -- the real CLI in a subprocess -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from llmjax.data.bundled.corpus import generate_corpus
    from llmjax.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(generate_corpus(2000, 0), out, vocab_size=512)
    return out


# A 1-layer T5 on short rows: these tests are about processes, signals and files, not model size.
SMALL_T5 = ["model.num_layers=1", "model.d_model=32", "model.d_kv=8", "model.d_ff=64", "model.num_heads=4",
            "data.encoder_length=32", "data.decoder_length=8", "optim.warmup_steps=2"]


def _cli(out_dir, tokenizer_dir, steps, every_steps=4):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    command = [
        sys.executable, "-m", "llmjax.cli", "train", "--config", str(REPO / "configs" / "pretrain_t5_tiny.yaml"),
        f"train.steps={steps}", "train.batch_size=8", "train.log_every_steps=1", "train.eval_every_steps=0",
        "train.export_hf=null", f"train.output_dir={out_dir}", f"checkpoint.every_steps={every_steps}",
        "checkpoint.keep=null", f"data.tokenizer={tokenizer_dir}", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1",
        *SMALL_T5,
    ]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_until(ready, process, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training exited ({process.returncode}) before {what}:\n{process.stdout.read()}")
        if ready():
            return
        time.sleep(0.02)
    raise AssertionError(f"no {what} within {timeout}s")


def _wait_for_step(out_dir, step, process):
    metrics = Path(out_dir) / "metrics.jsonl"

    def logged():
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        return bool(lines) and json.loads(lines[-1])["step"] >= step

    _wait_until(logged, process, f"step {step}")


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])  # SIGINT: what Ctrl-C sends
def test_sigterm_or_ctrl_c_saves_the_current_step_and_exits_zero(tmp_path, tokenizer_dir, signal_name):
    process = _cli(tmp_path, tokenizer_dir, steps=1000)
    _wait_for_step(tmp_path, 6, process)
    process.send_signal(getattr(signal, signal_name))
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    match = [line for line in output.splitlines() if f"received {signal_name} at step" in line]
    assert match, output
    stopped_at = int(match[0].split("at step ")[1].split(":")[0])
    steps = Checkpointer(tmp_path / "checkpoints").all_steps()
    assert steps[-1] == stopped_at and stopped_at < 1000
    assert f'"interrupted": "{signal_name}"' in output


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(tmp_path, tokenizer_dir):
    steps, every = 60, 4
    whole = _cli(tmp_path / "whole", tokenizer_dir, steps, every)
    killed = _cli(tmp_path / "killed", tokenizer_dir, steps, every)
    # Kill once checkpoint k is complete on disk (with async saves its manifest lands while step k + every
    # runs, a later save possibly half written), so there is something to resume from and 40+ steps with
    # 10+ saves (seconds) are still ahead: the kill lands mid-run even when this test process lags.
    kill_after = random.Random().choice(range(every, steps // 3, every))
    checkpoints = Checkpointer(tmp_path / "killed" / "checkpoints")
    _wait_until(lambda: checkpoints.has_step(kill_after), killed, f"checkpoint {kill_after}")
    killed.kill()  # SIGKILL: no handler runs, whatever was being written is left half done
    killed.wait()
    assert not checkpoints.has_step(steps), "the run ended before the kill landed"
    resumed = _cli(tmp_path / "killed", tokenizer_dir, steps, every)
    for process in (whole, resumed):
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output
    resumed_from = [line for line in output.splitlines() if "resumed from step" in line]
    assert resumed_from, output
    assert int(resumed_from[0].split("resumed from step ")[1].split()[0]) >= kill_after
    a = Checkpointer(tmp_path / "whole" / "checkpoints").restore_params(steps)
    b = Checkpointer(tmp_path / "killed" / "checkpoints").restore_params(steps)
    assert _bitwise_equal(a.state, b.state), f"killed after checkpoint {kill_after}: {resumed_from[0]}"


def test_schedule_steps_lets_a_run_train_in_segments_that_follow_the_whole_runs_schedule(tmp_path):
    """optim.schedule_steps: a cosine schedule over 6 steps, trained to 3 then resumed to 6, logs the
    learning rates of one 6-step run (without it the first segment would decay to 0 by step 3)."""
    import dataclasses

    from llmjax.train.optim import make_schedule

    def segment(steps):
        config = _config(tmp_path, steps=steps)
        config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, schedule_steps=6))
        train(_stage(), config, progress=False, peak_flops_per_sec=1e9)
        return config

    config = segment(3)
    segment(6)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    schedule = make_schedule(config.optim, 6)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    # metrics log the rate the step's update used (the schedule at step - 1)
    np.testing.assert_allclose([line["learning_rate"] for line in lines], [schedule(s - 1) for s in range(1, 7)],
                               rtol=1e-6)
    assert lines[2]["learning_rate"] > 0.1 * config.optim.learning_rate


def test_examples_cut_to_the_row_length_are_counted_and_said_once(tmp_path, capsys):
    model = build_model(TINY["decoder"])
    example_fn = lambda raw, rng: causal_lm_example(np.asarray(raw["ids"], np.int32))  # noqa: E731
    documents = [{"ids": list(range(3, 33))}] * 40  # 29 input tokens each, rows of 16
    data = DataIterator(documents, example_fn, batch_size=8, decoder_length=16, seed=0, truncate=True, pack=False)
    stage = Stage(name="test", model=model, loss_fn=lm_loss_fn(model), train_data=data)
    train(stage, _config(tmp_path, steps=3), progress=False, peak_flops_per_sec=1e9)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [line["data_truncated_decoder_examples"] for line in lines] == [8.0, 16.0, 24.0]  # every one is cut
    assert capsys.readouterr().out.count("training examples were cut to data.decoder_length") == 1
