"""``stage: dpo``: the loss is log 2 at step 0 and equals the hand formula on a fixed batch, the reference never
moves (full fine-tuning: a frozen copy outside the checkpoints; LoRA: the base itself, no copy), both families
run, a resumed run equals an uninterrupted one bitwise, and bad data or settings are clear errors."""

import json
import math
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest

from llmjax import hf
from llmjax.config import CONFIGS_DIR, ConfigError, DataConfig, load_config
from llmjax.data.tokenizer import train_tokenizer
from llmjax.errors import DataError
from llmjax.loading import ADAPTERS_KEY, REFERENCE_KEY, load_model, open_manager
from llmjax.model_config import DecoderConfig, T5Config
from llmjax.models import build_model, init_params
from llmjax.rl.reward import pair_prompt
from llmjax.rl.sequences import SequenceLengthError, response_outputs
from llmjax.stages import run_stage, stage_module
from llmjax.stages.dpo import dpo_loss_fn, pairs_batch, preference_rows
from llmjax.rl_configs import DPOConfig
from llmjax.sharding import make_mesh
from llmjax.train import loop

DPO_CONFIG = CONFIGS_DIR / "dpo_t5_tiny.yaml"
MODELS = {
    "t5": T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, dropout_rate=0.0),
    "decoder": DecoderConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2),
}
BETA = 0.5
THINGS = ("parcel", "printer", "kettle", "laptop", "invoice", "sofa")
NAMES = ("Olivia", "Marco", "Priya", "Hugo")
# Short pairs: the plumbing is under test, not the data. A constant learning rate, so that N steps continued to M
# compute what M steps do.
QUICK = ["dpo.prompt_length=56", "dpo.response_length=32", f"dpo.beta={BETA}", "train.batch_size=8",
         "train.log_every_steps=1", "train.eval_every_steps=0", "optim.warmup_steps=0", "optim.schedule=constant",
         "optim.learning_rate=1e-2", "checkpoint.every_steps=2", "checkpoint.keep=null", "checkpoint.async_save=false",
         "train.export_hf=null"]
LORA = ["lora.r=4", "lora.lora_alpha=8", "lora.target_modules=[q, v]"]
LORA_DECODER = ["lora.r=4", "lora.lora_alpha=8", "lora.target_modules=[q_proj, v_proj]"]


def _pairs(count: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + count):
        name, thing = NAMES[i % len(NAMES)], THINGS[i % len(THINGS)]
        rows.append({"prompt": f"#Person1#: the {thing} is late. #Person2#: sorry {name}.",
                     "chosen": f"{name} is sorry about the {thing}.",
                     "rejected": f"{name} calls the other an idiot about the {thing}."})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``(tokenizer, train.jsonl, eval.jsonl)``: 24 training and 5 held-out pairs."""
    root = tmp_path_factory.mktemp("pairs")
    rows = _pairs(29)
    texts = [pair_prompt(r["prompt"]) for r in rows] + [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    tokenizer = train_tokenizer(texts * 4, root / "tokenizer", vocab_size=64, num_extra_ids=0)
    return tokenizer, _write_jsonl(root / "train.jsonl", rows[:24]), _write_jsonl(root / "eval.jsonl", rows[24:])


@pytest.fixture(scope="module")
def bases(data, tmp_path_factory):
    """family -> a Hugging Face directory of a random tiny model with the tokenizer beside it (the "SFT model")."""
    tokenizer = data[0]
    out = {}
    for index, (family, cfg) in enumerate(MODELS.items()):
        model = build_model(cfg)
        directory = tmp_path_factory.mktemp(f"base_{family}")
        hf.save_pretrained(model, init_params(model, jax.random.key(index)), directory)
        tokenizer.save_pretrained(directory)
        out[family] = directory
    return out


def _config(base, data, out, *overrides):
    _, train_file, eval_file = data
    return load_config(DPO_CONFIG, ["model={}", f"init_from={base}", "data.kind=jsonl", f"data.source={train_file}",
                                    f"data.eval_source={eval_file}", f"train.output_dir={out}", *QUICK, *overrides])


def _train_capturing(config, mesh="one"):
    """Run ``config``'s stage with the real loop; ``(summary, metrics rows, final full tree on the host)``."""
    stage = stage_module("dpo").build_stage(config)
    captured = {}
    export = stage.export or partial(loop._export, stage)  # the loop's own export when the stage gives none

    def capture(state, out):
        captured["tree"] = jax.device_get(state.full_params())
        return export(state, out)

    stage.export = capture
    if mesh == "one":  # compiling for one device is cheaper; the 8 fake ones (mesh=None) for the main run only
        mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    summary = loop.train(stage, config, mesh=mesh, progress=False)
    rows = [json.loads(line) for line in (Path(config.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, captured["tree"]


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _saved_params(checkpoints: Path, step: int):
    manager = open_manager(checkpoints, read_only=True)
    saved = manager.item_metadata(step)["state"]
    manager.close()
    return saved


@pytest.fixture(scope="module")
def full_run(bases, data, tmp_path_factory):
    """4 steps of full-fine-tuning DPO of the T5, uninterrupted: ``(out dir, summary, metrics rows, final tree)``."""
    out = tmp_path_factory.mktemp("full") / "run"
    return (out, *_train_capturing(_config(bases["t5"], data, out, "train.steps=4", "train.export_hf=hf",
                                           "train.eval_every_steps=4", "train.eval_steps=0"), mesh=None))


def _starts_at_log2(rows):
    """Step 1 is computed on the initial params, where the policy is the reference: every log-ratio is 0 (up
    to the rounding of two differently fused forward passes), the loss log 2."""
    first = [r for r in rows if r["split"] == "train"][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert max(abs(first[k]) for k in ("chosen_reward", "rejected_reward", "margin")) < 1e-5
    assert 0.0 <= first["accuracy"] <= 1.0


@pytest.mark.slow
def test_full_dpo_starts_at_log2_keeps_its_reference_and_exports_the_policy_alone(bases, full_run):
    out, summary, rows, tree = full_run
    _starts_at_log2(rows)
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] and train_rows[-1]["margin"] > 0
    evals = [r for r in rows if r["split"] == "eval"]  # all 5 held-out pairs (a padded batch of 8)
    assert [r["step"] for r in evals] == [4] and evals[0]["tokens"] == 5.0
    assert 0.0 <= evals[0]["accuracy"] <= 1.0 and evals[0]["margin"] == pytest.approx(
        evals[0]["chosen_reward"] - evals[0]["rejected_reward"], abs=1e-5)

    base = load_model(bases["t5"]).params
    assert _leaves_equal(tree[REFERENCE_KEY], base)  # bitwise: donation and updates never touched it
    policy = {k: v for k, v in tree.items() if k != REFERENCE_KEY}
    moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), policy, base)
    assert all(jax.tree_util.tree_leaves(moved))
    exported = load_model(summary["export"])
    assert _leaves_equal(exported.params, policy) and (Path(summary["export"]) / "spiece.model").is_file()
    # The reference is no trainable part: the checkpoint (with a base: trainable params only) has none of it.
    saved = _saved_params(out / "checkpoints", 4)
    assert REFERENCE_KEY not in saved["params"] and not saved.get("frozen_params")


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_loss_on_a_fixed_batch_equals_the_hand_formula(bases, data, family):
    tokenizer = data[0]
    cfg = DPOConfig(beta=BETA, prompt_length=56, response_length=32)
    model = build_model(MODELS[family])
    reference = load_model(bases[family]).params
    noise = jax.random.split(jax.random.key(7), len(jax.tree_util.tree_leaves(reference)))
    leaves, treedef = jax.tree_util.tree_flatten(reference)
    policy = treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, noise)])
    batch = pairs_batch(model, tokenizer, _pairs(4, offset=3), cfg, "test pairs")
    batch["weight"] = np.array([1, 1, 1, 0], np.float32)  # the last row pads: it counts for nothing
    loss, sums = jax.jit(dpo_loss_fn(model, BETA))({**policy, REFERENCE_KEY: reference}, batch, None)
    outputs = jax.jit(lambda params, scored: response_outputs(model, params, scored)[0])

    def logp(params, side):  # one side at a time, the log-softmax in numpy
        scored = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
                  "response_ids": batch[f"{side}_ids"], "response_mask": batch[f"{side}_mask"]}
        logits = np.asarray(outputs(params, scored), np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        picked = np.take_along_axis(log_softmax, scored["response_ids"][..., None], -1)[..., 0]
        return (picked * scored["response_mask"]).sum(1)

    chosen = BETA * (logp(policy, "chosen") - logp(reference, "chosen"))
    rejected = BETA * (logp(policy, "rejected") - logp(reference, "rejected"))
    losses = np.log1p(np.exp(-(chosen - rejected)))  # -log sigmoid(x)
    weight = batch["weight"]
    assert abs(chosen - rejected).max() > 1e-3  # the policy differs from the reference: a real test
    np.testing.assert_allclose(float(loss), (losses * weight).sum(), rtol=1e-4)
    np.testing.assert_allclose(float(sums["loss"]), (losses * weight).sum(), rtol=1e-4)
    np.testing.assert_allclose(float(sums["chosen_reward"]), (chosen * weight).sum(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(sums["rejected_reward"]), (rejected * weight).sum(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(sums["margin"]), ((chosen - rejected) * weight).sum(), rtol=1e-4, atol=1e-5)
    assert float(sums["accuracy"]) == float(((chosen > rejected) * weight).sum())
    assert float(sums["weights"]) == 3.0


def test_lora_dpo_of_the_decoder_trains_adapters_against_the_base_itself(bases, data, tmp_path):
    out = tmp_path / "lora"
    summary, rows, tree = _train_capturing(_config(bases["decoder"], data, out, "train.steps=2", "train.export_hf=hf",
                                                   *LORA_DECODER))
    _starts_at_log2(rows)  # lora_B = 0: the policy is the base
    assert REFERENCE_KEY not in tree and ADAPTERS_KEY in tree  # the reference is the base with adapters off
    base = load_model(bases["decoder"]).params
    assert _leaves_equal({k: v for k, v in tree.items() if k != ADAPTERS_KEY}, base)
    assert any(np.abs(b).max() > 0 for b in jax.tree_util.tree_leaves(tree[ADAPTERS_KEY]))
    assert set(_saved_params(out / "checkpoints", 2)["params"]) == {ADAPTERS_KEY}
    export = Path(summary["export"])
    assert (export / "adapter" / "adapter_config.json").is_file()
    assert not _leaves_equal(load_model(export).params, base)  # the merged policy


@pytest.mark.slow
def test_resume_continues_bitwise_and_rebuilds_the_reference_from_the_base(bases, data, full_run, tmp_path):
    whole = full_run[3]  # on the 8 fake devices, as these runs
    run_stage(_config(bases["t5"], data, tmp_path / "split", "train.steps=2"), progress=False)
    summary, _, resumed = _train_capturing(_config(bases["t5"], data, tmp_path / "split", "train.steps=4",
                                                   "train.export_hf=hf"), mesh=None)
    assert summary["start_step"] == 2 and summary["step"] == 4
    assert _leaves_equal(whole, resumed)  # policy and reference alike
    # A checkpoint read back is the policy alone, laid over the base.
    assert _leaves_equal(load_model(tmp_path / "split" / "checkpoints").params,
                         {k: v for k, v in whole.items() if k != REFERENCE_KEY})


def test_bad_data_and_settings_are_clear_errors(bases, data, tmp_path):
    build = stage_module("dpo").build_stage
    base = bases["t5"]
    broken = _write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "hi", "chosen": "a"}])
    with pytest.raises(DataError, match="missing field 'rejected'"):
        build(_config(base, data, tmp_path, f"data.source={broken}"))
    with pytest.raises(SequenceLengthError, match="chosen response 0 has 16 tokens .* response_length"):
        build(_config(base, data, tmp_path, "dpo.response_length=3"))
    with pytest.raises(SequenceLengthError, match="raise the stage's prompt_length"):
        build(_config(base, data, tmp_path, "dpo.prompt_length=8"))
    with pytest.raises(ConfigError, match="data.source='detox_labels' is not a bundled preference-pair set"):
        build(_config(base, data, tmp_path, "data.kind=bundled", "data.source=detox_labels"))
    with pytest.raises(ConfigError, match="data.kind='text': stage: dpo reads data.kind bundled"):
        build(_config(base, data, tmp_path, "data.kind=text"))
    with pytest.raises(ConfigError, match="needs held-out pairs: set data.eval_source"):
        build(_config(base, data, tmp_path, "data.eval_source=null", "train.eval_every_steps=2"))
    with pytest.raises(ConfigError, match="stage: dpo does not train a soft prompt"):
        build(_config(base, data, tmp_path, "prompt_tuning.num_virtual_tokens=4",
                      "data.packing=false"))
    with pytest.raises(ConfigError, match="lora.lora_dropout=0.1 is not supported by stage 'dpo'"):
        build(_config(base, data, tmp_path, *LORA, "lora.lora_dropout=0.1"))


def test_bundled_pairs_are_the_detox_splits():
    from llmjax.data.bundled import detox

    train_rows, eval_rows = preference_rows(DataConfig(kind="bundled", source="detox_pairs"), need_eval=True)
    assert train_rows == detox.preference_pairs("train") and eval_rows == detox.preference_pairs("validation")
    assert preference_rows(DataConfig(kind="bundled", source="detox_pairs"), need_eval=False)[1] is None
