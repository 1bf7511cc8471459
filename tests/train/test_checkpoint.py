"""Checkpoints: bitwise round trip into any mesh, corruption detected and fallen back from, retention."""

import json

import jax
import numpy as np
import optax
import pytest

from llmjax import sharding
from llmjax.loading import ModelPathError
from llmjax.models import build_model, init_params
from llmjax.train.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointCorruptError,
    CheckpointSaveError,
    export_checkpoint_to_hf,
    model_meta,
)
from llmjax.train.state import abstract_train_state, init_train_state, trainable_matching, train_everything
from tests.train.helpers import TINY

FAMILY = "decoder"


@pytest.fixture(scope="module")
def model():
    return build_model(TINY[FAMILY])


def _state(model, mesh, step, seed=0, is_trainable=train_everything):
    """A state whose every leaf (params, Adam moments, step, rng) is distinct and nonzero."""
    tx = optax.adamw(1e-3)
    params = jax.device_get(init_params(model, jax.random.PRNGKey(seed)))
    state, _ = init_train_state(model, tx, is_trainable, seed, mesh, params=params)
    moments = jax.tree_util.tree_map(lambda x: x * 0.5 + 0.25 if x.ndim else x + 7, state.opt_state)
    return state.replace(step=state.step + step, opt_state=moments), tx


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


def test_round_trip_is_bitwise_and_lands_in_the_target_shardings(model, tmp_path):
    save_mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
    state, tx = _state(model, save_mesh, step=7, is_trainable=trainable_matching("layers_1", "lm_head"))
    checkpointer = Checkpointer(tmp_path, keep=2)
    checkpointer.save(state, {"epoch": 1, "position": 5}, model_meta(model, tokenizer_dir=None))

    restore_mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)  # a different mesh than at save time
    abstract = abstract_train_state(model, tx, trainable_matching("layers_1", "lm_head"), restore_mesh)
    restored = Checkpointer(tmp_path).restore_latest(abstract)
    assert restored.step == 7 and restored.data_state == {"epoch": 1, "position": 5}
    assert restored.meta["family"] == FAMILY and restored.meta["model_config"]["hidden_size"] == 32
    assert _leaves_equal(jax.device_get(restored.state), jax.device_get(state))
    kernel = restored.state.params["lm_head"]["kernel"]
    assert kernel.sharding == abstract.params["lm_head"]["kernel"].sharding
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor") and kernel.sharding.mesh == restore_mesh


def _save_steps(model, directory, steps, keep=3):
    mesh = sharding.make_mesh(data=8)
    checkpointer = Checkpointer(directory, keep=keep)
    states = {}
    for step in steps:
        states[step], tx = _state(model, mesh, step=step, seed=step)
        checkpointer.save(states[step], {"position": step}, model_meta(model))
    return checkpointer, states, abstract_train_state(model, tx, train_everything, mesh)


def _largest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest"])
def test_damaged_newest_checkpoint_is_refused_then_fallen_back_from(model, tmp_path, damage):
    checkpointer, states, abstract = _save_steps(model, tmp_path, [2, 4])
    newest = tmp_path / "4"
    if damage == "no_manifest":  # the run died between orbax's rename and the manifest
        (newest / MANIFEST).unlink()
        expected = r"checkpoint step 4 at .*/4 is incomplete: llmjax_manifest.json is missing"
    else:
        victim = _largest_file(newest)
        data = bytearray(victim.read_bytes())
        if damage == "truncate":
            victim.write_bytes(data[: len(data) // 2])
            expected = r"checkpoint step 4 at .*/4 is truncated or corrupted: file .* has \d+ bytes, the manifest says"
        else:
            data[len(data) // 2] ^= 0xFF
            victim.write_bytes(data)
            expected = r"checkpoint step 4 at .*/4 is corrupted: file .* does not match its sha256 checksum"

    with pytest.raises(CheckpointCorruptError, match=expected + r".*checkpoint.fallback"):
        checkpointer.restore_latest(abstract, fallback=False)
    with pytest.warns(UserWarning, match="falling back to the previous checkpoint"):
        restored = checkpointer.restore_latest(abstract, fallback=True)
    assert restored.step == 2 and restored.data_state == {"position": 2}
    assert len(restored.skipped) == 1 and "step 4" in restored.skipped[0]
    assert _leaves_equal(jax.device_get(restored.state.params), jax.device_get(states[2].params))
    # The bad step was moved aside: it is not resumed again, and step 4 can be written afresh.
    assert checkpointer.all_steps() == [2] and (tmp_path / "corrupt" / "4").is_dir()
    checkpointer.save(states[4], {"position": 4}, model_meta(model))
    assert checkpointer.restore_latest(abstract).step == 4


def test_no_usable_checkpoint_is_a_clear_error(model, tmp_path):
    checkpointer, _, abstract = _save_steps(model, tmp_path, [3])
    (tmp_path / "3" / MANIFEST).unlink()
    with pytest.warns(UserWarning):
        with pytest.raises(CheckpointCorruptError, match=f"no usable checkpoint in {tmp_path}"):
            checkpointer.restore_latest(abstract, fallback=True)


def test_retention_keeps_the_newest_complete_checkpoints(model, tmp_path):
    checkpointer, _, _ = _save_steps(model, tmp_path, [1, 2, 3, 4], keep=2)
    assert checkpointer.all_steps() == [3, 4]
    # An incomplete newest step does not count as complete: older complete ones stay.
    (tmp_path / "4" / MANIFEST).unlink()
    state, _ = _state(model, sharding.make_mesh(data=8), step=5)
    (tmp_path / "5").mkdir()  # stand-in for a step orbax never finished: not listed, not kept
    checkpointer.save(state, None, model_meta(model))
    assert checkpointer.all_steps() == [3, 5]
    manifest = json.loads((tmp_path / "5" / MANIFEST).read_text())
    assert manifest["step"] == 5 and all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    with pytest.raises(ValueError, match="checkpoint.keep must be >= 1"):
        Checkpointer(tmp_path, keep=0)


def test_export_to_hugging_face_loads_in_transformers(model, tmp_path):
    import torch
    import transformers

    checkpointer, states, _ = _save_steps(model, tmp_path / "ckpt", [6])
    checkpointer.close()
    out = export_checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = np.array([[5, 9, 17, 3, 44, 2]], np.int32)
    ours = model.apply({"params": jax.device_get(states[6].full_params())}, ids)
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
    with pytest.raises(ModelPathError, match="checkpoint step 9 not in"):
        Checkpointer(tmp_path / "ckpt").restore_params(9)


def test_import_from_hugging_face_gives_the_same_params(model, tmp_path):
    from llmjax.train.checkpoint import import_hf_to_checkpoint

    checkpointer, states, _ = _save_steps(model, tmp_path / "ckpt", [6])
    checkpointer.close()
    export_checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    import_hf_to_checkpoint(tmp_path / "hf", tmp_path / "imported")
    restored = Checkpointer(tmp_path / "imported").restore_params()
    assert restored.step == 0 and restored.meta["family"] == FAMILY
    assert _leaves_equal(restored.state, jax.device_get(states[6].full_params()))


def test_a_full_disk_is_one_error_naming_the_last_complete_step(model, tmp_path, monkeypatch):
    from llmjax.train import checkpoint as checkpoint_module

    state, _ = _state(model, sharding.make_mesh(data=8), step=5)
    checkpointer = Checkpointer(tmp_path, keep=None)
    checkpointer.save(state, None, model_meta(model))
    later = state.replace(step=state.step + 1)
    last = rf"; the last complete checkpoint is step 5 \({tmp_path / '5'}\)"

    # Too little space: refused before orbax writes anything.
    monkeypatch.setattr(checkpoint_module, "_free_bytes", lambda directory: 0)
    with pytest.raises(CheckpointSaveError, match=rf"saving checkpoint step 6 to {tmp_path} failed: it needs about "
                                                  rf"\d+\.\d MiB and the disk has 0\.0 MiB free{last}"):
        checkpointer.save(later, None, model_meta(model))

    # The disk fills while orbax writes: its error (ValueError text with the OS error code) becomes ours.
    monkeypatch.setattr(checkpoint_module, "_free_bytes", lambda directory: 2**40)

    def disk_full(*args, **kwargs):
        raise ValueError("RESOURCE_EXHAUSTED: Error writing \"params.x\": Failed to write 1077393 bytes to file 8: "
                         "No space left on device [os_error_code='28']")

    monkeypatch.setattr(checkpointer._manager, "save", disk_full)
    with pytest.raises(CheckpointSaveError, match=f"failed: No space left on device{last}"):
        checkpointer.save(later, None, model_meta(model))

    # Any other failure is a bug, not the user's disk: it keeps its type and traceback.
    monkeypatch.setattr(checkpointer._manager, "save", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        checkpointer.save(later, None, model_meta(model))
    checkpointer.verify(5)  # the earlier checkpoint is intact


def test_reading_a_missing_checkpoint_directory_creates_nothing(tmp_path):
    with pytest.raises(ModelPathError, match="nowhere does not exist"):
        export_checkpoint_to_hf(tmp_path / "nowhere", tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
