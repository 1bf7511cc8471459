"""The one model loader: Hugging Face directories, checkpoint and run directories, bad paths.

References: params saved by ``hf.save_pretrained`` and by the training ``Checkpointer`` (with a
trainable/frozen split), compared leaf by leaf with what ``load_model`` returns.
"""

import logging

import jax
import numpy as np
import optax
import pytest

from llmjax import hf, sharding
from llmjax.errors import UserError
from llmjax.loading import MANIFEST, CheckpointCorruptError, ModelPathError, load_model
from llmjax.models import build_model, init_params
from llmjax.train.checkpoint import Checkpointer, model_meta
from llmjax.train.state import init_train_state, trainable_matching
from tests.train.helpers import TINY


@pytest.fixture(scope="module")
def model():
    return build_model(TINY["decoder"])


def _params(model, seed):
    return jax.device_get(init_params(model, jax.random.PRNGKey(seed)))


def _equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
            and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    """A run directory whose checkpoints/ holds steps 3 and 5, each split into trainable and frozen."""
    out = tmp_path_factory.mktemp("run")
    mesh = sharding.make_mesh(data=8)
    checkpointer = Checkpointer(out / "checkpoints", keep=None)
    params = {}
    for step in (3, 5):
        params[step] = _params(model, step)
        state, _ = init_train_state(model, optax.sgd(0.1), trainable_matching("lm_head"), step, mesh,
                                    params=params[step])
        assert "lm_head" in state.params and "lm_head" not in state.frozen_params
        checkpointer.save(state.replace(step=state.step + step), None,
                          model_meta(model, tokenizer_dir=str(out / "tokenizer"), stage="pretrain"))
    checkpointer.close()
    return out, params


def test_checkpoint_and_run_dir_give_merged_params_of_the_newest_step(model, run_dir):
    out, params = run_dir
    for where in (out, out / "checkpoints"):
        loaded = load_model(where)
        assert loaded.kind == "checkpoint" and loaded.path == (out / "checkpoints").absolute()
        assert loaded.step == 5 and loaded.config == model.config
        assert loaded.tokenizer_dir == out / "tokenizer" and loaded.meta["stage"] == "pretrain"
        assert _equal(loaded.params, params[5])
        assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(loaded.params))
    assert _equal(load_model(out, step=3).params, params[3])


def test_incomplete_newest_step_is_skipped_and_a_corrupt_one_refused(model, run_dir, tmp_path, caplog):
    import shutil

    out, params = run_dir
    copy = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints", copy)
    (copy / "5" / MANIFEST).unlink()  # the run died while writing step 5
    with caplog.at_level(logging.WARNING, logger="llmjax.loading"):
        loaded = load_model(copy)
    assert loaded.step == 3 and _equal(loaded.params, params[3])
    assert "skipping incomplete checkpoint steps [5]" in caplog.text
    with pytest.raises(CheckpointCorruptError, match=f"step 5 at {copy / '5'} is incomplete"):
        load_model(copy, step=5)
    biggest = max((p for p in (copy / "3").rglob("*") if p.is_file() and p.name != MANIFEST),
                  key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:-1])
    with pytest.raises(CheckpointCorruptError, match="step 3 .* is truncated or corrupted"):
        load_model(copy)


def test_hf_dir_records_its_tokenizer_only_when_it_has_one(model, tmp_path):
    params = _params(model, 0)
    hf.save_pretrained(model, params, tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert loaded.kind == "hf" and loaded.step is None and loaded.tokenizer_dir is None and loaded.meta == {}
    assert loaded.config == model.config and _equal(loaded.params, params)
    (tmp_path / "hf" / "spiece.model").write_bytes(b"")
    assert load_model(tmp_path / "hf").tokenizer_dir == tmp_path / "hf"
    with pytest.raises(ModelPathError, match="Hugging Face directory, which has no steps"):
        load_model(tmp_path / "hf", step=2)


def test_bad_paths_are_user_errors_naming_the_fix(run_dir, tmp_path):
    out, _ = run_dir
    (tmp_path / "empty").mkdir()
    cases = {tmp_path / "missing": "model directory .*missing does not exist",
             tmp_path / "empty": "neither a Hugging Face directory .* nor an llmjax checkpoint"}
    for path, message in cases.items():
        with pytest.raises(UserError, match=message):
            load_model(path)
    with pytest.raises(ModelPathError, match=r"checkpoint step 4 not in .*available: \[3, 5\]"):
        load_model(out, step=4)
