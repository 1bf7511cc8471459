"""``stage: distill``: a smaller student learns from a frozen teacher (an llmjax run or a Hugging Face directory) on
the SFT data path, for T5 and the decoder, sharded; the teacher never moves and is never saved (its sha256 is), the
loss on a real batch is the hand formula with no gradient reaching the teacher, a resume equals an uninterrupted
run, and mismatched teachers or settings are clear errors."""

import json
import shutil
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax import hf
from llmjax.config import CONFIGS_DIR, ConfigError, load_config
from llmjax.loading import TEACHER_KEY, load_model, model_params, model_sha256, open_manager
from llmjax.model_config import DecoderConfig
from llmjax.models import build_model, init_params
from llmjax.sharding import make_mesh
from llmjax.stages import stage_module
from llmjax.train import loop
from llmjax.train.lm_loss import lm_logits, lm_loss_fn

DISTILL_CONFIG = CONFIGS_DIR / "distill_t5_tiny.yaml"
TEMPERATURE, ALPHA = 2.0, 0.6
# The students: half the teachers' width (the T5 teacher is the session's pre-training run, d_model 32).
T5_STUDENT = ["model.num_layers=1", "model.d_model=16", "model.d_kv=4", "model.d_ff=32", "model.num_heads=4"]
DECODER_TEACHER = DecoderConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
DECODER_STUDENT = ["model={family: decoder, vocab_size: 512, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
                   "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512}"]
# Short rows and runs; a constant learning rate, so N steps continued to M compute what M steps do.
QUICK = [f"distill.temperature={TEMPERATURE}", f"distill.alpha={ALPHA}", "train.batch_size=8",
         "train.log_every_steps=1", "train.eval_every_steps=0", "train.rouge_every_steps=0", "data.encoder_length=128",
         "data.decoder_length=32", "optim.warmup_steps=0", "optim.schedule=constant", "optim.learning_rate=1e-2",
         "checkpoint.every_steps=2", "checkpoint.keep=null", "checkpoint.async_save=false", "train.export_hf=null"]


def _config(teacher, out, *overrides, student=T5_STUDENT):
    return load_config(DISTILL_CONFIG, [f"distill.teacher={teacher}", *student, f"train.output_dir={out}", *QUICK,
                                        *overrides])


def _run(teacher, out, *overrides, **kwargs):
    """Train with an export (where the final tree is captured)."""
    return _train_capturing(_config(teacher, out, *overrides, "train.export_hf=hf", **kwargs))


def _train_capturing(config, mesh="one"):
    """Run the stage with the real loop; ``(summary, metrics rows, final full tree on the host, stage)``."""
    stage = stage_module("distill").build_stage(config)
    captured = {}
    export = stage.export or partial(loop._export, stage)

    def capture(state, out):
        captured["tree"] = jax.device_get(state.full_params())
        return export(state, out)

    stage.export = capture
    if mesh == "one":  # one device compiles faster; the 8 fake ones (mesh=None) where sharding is under test
        mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    summary = loop.train(stage, config, mesh=mesh, progress=False)
    rows = [json.loads(line) for line in (Path(config.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, captured["tree"], stage


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _saved_state(checkpoints: Path, step: int):
    """The state tree (shapes) a saved step holds."""
    manager = open_manager(checkpoints, read_only=True)
    try:
        return manager.item_metadata(step)["state"]
    finally:
        manager.close()


@pytest.fixture(scope="module")
def decoder_teacher(pretrained, tmp_path_factory):
    """A Hugging Face directory of a random tiny decoder with the pre-training run's tokenizer beside it."""
    directory = tmp_path_factory.mktemp("decoder_teacher")
    model = build_model(DECODER_TEACHER)
    hf.save_pretrained(model, init_params(model, jax.random.key(3)), directory)
    shutil.copy(pretrained / "tokenizer" / "spiece.model", directory)
    return directory


@pytest.fixture(scope="module")
def t5_run(pretrained, tmp_path_factory):
    """4 uninterrupted steps of the T5 student from the pre-training run as teacher: ``(out, summary, rows, tree)``."""
    out = tmp_path_factory.mktemp("t5_distill") / "run"
    return (out, *_run(pretrained, out, "train.steps=4", "train.eval_every_steps=4", "train.eval_steps=1")[:3])


@pytest.mark.slow
def test_t5_student_learns_from_a_frozen_checkpoint_teacher_and_exports_alone(pretrained, t5_run):
    out, summary, rows, tree = t5_run
    teacher = load_model(pretrained)
    assert _leaves_equal(tree[TEACHER_KEY], teacher.params)  # bitwise: donation and updates never touched it

    train_rows = [r for r in rows if r["split"] == "train"]
    for r in train_rows:  # the logged per-token loss is the mix of its logged parts
        assert r["loss"] == pytest.approx(ALPHA * TEMPERATURE ** 2 * r["kl"] + (1 - ALPHA) * r["ce"], rel=1e-5)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [4] and evals[0]["kl"] > 0

    student = model_params(tree)
    exported = load_model(summary["export"])
    assert exported.config.d_model == 16 and _leaves_equal(exported.params, student)
    assert (Path(summary["export"]) / "spiece.model").read_bytes() == (teacher.tokenizer_dir / "spiece.model").read_bytes()

    # Checkpoints and optimizer state hold the student alone; the metadata names the teacher and its hash.
    state = _saved_state(out / "checkpoints", 4)
    assert TEACHER_KEY not in state["params"] and TEACHER_KEY not in (state.get("frozen_params") or {})
    student_size = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(student))
    assert sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(state["params"])) == student_size
    assert sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(state["opt_state"])) < 3 * student_size
    meta = load_model(out).meta
    assert meta["stage"] == "distill" and meta["distill"]["alpha"] == ALPHA
    assert meta["frozen_models"][TEACHER_KEY]["sha256"] == model_sha256(teacher)


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run_and_a_changed_teacher_is_refused(pretrained, t5_run, tmp_path):
    whole = t5_run[3]
    _run(pretrained, tmp_path / "cut", "train.steps=2")
    _, rows, resumed, _ = _run(pretrained, tmp_path / "cut", "train.steps=4", "train.resume=true")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert _leaves_equal(model_params(resumed), model_params(whole))
    assert _leaves_equal(resumed[TEACHER_KEY], whole[TEACHER_KEY])

    # The same weights exported as a Hugging Face directory are other files: another sha256, refused on resume.
    other = tmp_path / "teacher_hf"
    teacher = load_model(pretrained)
    hf.save_pretrained(teacher.model, teacher.params, other)
    shutil.copy(teacher.tokenizer_dir / "spiece.model", other)
    with pytest.raises(loop.BaseChangedError, match="the teacher model changed"):
        _run(other, tmp_path / "cut", "train.steps=6", "train.resume=true")


def test_decoder_distills_sharded_teacher_unchanged_loss_is_the_hand_formula_no_gradient_to_it(decoder_teacher,
                                                                                                 tmp_path):
    config = _config(decoder_teacher, tmp_path / "dec", "train.steps=2", "data.decoder_length=384",
                     "train.export_hf=hf", student=DECODER_STUDENT)
    _, rows, tree, stage = _train_capturing(config, mesh=None)  # 8 fake devices: the teacher sharded like the rest
    teacher = load_model(decoder_teacher)
    assert _leaves_equal(tree[TEACHER_KEY], teacher.params)
    assert all(np.isfinite(r["loss"]) and r["kl"] > 0 for r in rows if r["split"] == "train")

    # The stage's loss on its next batch, against numpy on each model's logits.
    batch = next(stage.train_data)
    student = model_params(tree)
    objective, sums = jax.jit(stage.loss_fn)(tree, batch, None)

    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    logits = jax.jit(lm_logits, static_argnums=0)
    s = np.asarray(logits(stage.model, student, batch), np.float64)
    t = np.asarray(logits(teacher.model, teacher.params, batch), np.float64)
    p_log, q_log = log_softmax(t / TEMPERATURE), log_softmax(s / TEMPERATURE)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)
    ce = -np.take_along_axis(log_softmax(s), batch["decoder_target_tokens"][..., None], -1)[..., 0]
    weights = np.asarray(batch["decoder_loss_weights"], np.float64)
    assert weights.sum() > 8 and (weights == 0).any()  # responses only: the prompts carry no loss
    np.testing.assert_allclose(float(objective), (weights * (ALPHA * TEMPERATURE ** 2 * kl + (1 - ALPHA) * ce)).sum(),
                               rtol=1e-4)
    assert float(sums["weights"]) == weights.sum()

    grads = jax.jit(jax.grad(lambda tr: stage.loss_fn(tr, batch, None)[0]))(tree)
    assert not any(np.asarray(g).any() for g in jax.tree_util.tree_leaves(grads[TEACHER_KEY]))
    assert all(np.asarray(g).any() for g in jax.tree_util.tree_leaves(model_params(grads)))


def test_alpha_0_is_the_sft_loss(pretrained, tmp_path):
    stage = stage_module("distill").build_stage(_config(pretrained, tmp_path / "a0", "distill.alpha=0.0",
                                                        "optim.z_loss=1e-3"))
    batch = next(stage.train_data)
    student = init_params(stage.model, jax.random.key(1))
    objective, _ = jax.jit(stage.loss_fn)({**student, TEACHER_KEY: load_model(pretrained).params}, batch, None)
    expected, _ = jax.jit(lm_loss_fn(stage.model, z_loss=1e-3))(student, batch, None)
    np.testing.assert_allclose(float(objective), float(expected), rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["model.vocab_size=256"], r"model.vocab_size=256 but distill.teacher=.* has vocab_size=512"),
    (DECODER_STUDENT, r"is a 't5' model but the student \(model:\) is 'decoder'"),
    (["lora.r=2", "lora.lora_alpha=4", "lora.target_modules=[q]"], "stage: distill trains the whole student"),
    (["data.tokenizer=TOKENIZER"], "is not the teacher's"),
])
def test_a_mismatched_teacher_or_setting_is_a_config_error(pretrained, decoder_teacher, tmp_path, overrides,
                                                            message):
    other = tmp_path / "other_tokenizer"
    other.mkdir()
    (other / "spiece.model").write_bytes((pretrained / "tokenizer" / "spiece.model").read_bytes() + b"x")
    overrides = [o.replace("TOKENIZER", str(other)) for o in overrides]
    with pytest.raises(ConfigError, match=message):
        stage_module("distill").build_stage(_config(pretrained, tmp_path / "bad", *overrides))


@pytest.mark.parametrize("overrides, message", [
    (["distill.alpha=1.5"], r"distill.alpha must be in \[0, 1\]"),
    (["distill.temperature=0"], "distill.temperature must be > 0"),
    (["stage=sft"], "the distill: section configures stage: distill"),
])
def test_bad_distill_settings_are_config_errors(pretrained, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(pretrained, tmp_path / "bad", *overrides)


def test_stage_distill_needs_its_section(tmp_path):
    with pytest.raises(ConfigError, match="stage: distill needs a distill: section naming at least distill.teacher"):
        load_config(CONFIGS_DIR / "sft_t5_tiny.yaml", ["stage=distill"])
