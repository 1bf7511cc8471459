"""Adapter training against an independent reference: a few steps of a ``lora:`` (plain or DoRA) or
``prompt_tuning:`` SFT run (llmjax's loop: LoRA computed factored or the soft prompt prepended, AdamW with weight
decay, gradient clipping, warmup and cosine decay) equal the same steps taken by ``peft`` on ``transformers``'
model with ``torch.optim.AdamW``, from the run's own initial adapters, on the run's own batches: per-step loss
and gradient norm, and the adapters after the last step."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

from llmjax import lora, prompt_tuning, sharding  # noqa: E402
from llmjax.config import load_config  # noqa: E402
from llmjax.loading import ADAPTERS_KEY, SOFT_PROMPT_KEY, read_checkpoint_params  # noqa: E402
from llmjax.stages import run_stage, stage_module  # noqa: E402
from llmjax.stages.init_source import resolve_init  # noqa: E402
from llmjax.testing import torch_llama, torch_t5  # noqa: E402
from llmjax.train.optim import make_optimizer  # noqa: E402
from llmjax.train.state import init_train_state  # noqa: E402
from tests.stages.test_sft import CONFIGS_DIR, SFT_CONFIG, _metrics, torch_sft_loss  # noqa: E402

STEPS = 5
VIRTUAL_TOKENS = 4
# Warmup then cosine decay, decoupled weight decay on every adapter matrix; each case's clip binds on some steps.
OPTIM = ["optim.learning_rate=1e-2", "optim.schedule=cosine", "optim.warmup_steps=2", "optim.weight_decay=0.1"]
MODELS = {  # family -> (random transformers model, run config, decoder rows)
    "t5": (lambda: torch_t5(0, vocab_size=512, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                            feed_forward_proj="gated-gelu", tie_word_embeddings=False), SFT_CONFIG, 32),
    "llama": (lambda: torch_llama(0, vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
              CONFIGS_DIR / "sft_decoder_tiny.yaml", 384),
    "t5-tied": (lambda: torch_t5(0, vocab_size=512, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", tie_word_embeddings=True), SFT_CONFIG, 32),
    "llama-tied": (lambda: torch_llama(0, vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                       tie_word_embeddings=True), CONFIGS_DIR / "sft_decoder_tiny.yaml", 384),
}
CASES = {  # case -> (family, scan_layers, adapter overrides, clip)
    "lora-t5-scanned": ("t5", True, ["lora.r=4", "lora.lora_alpha=8", "lora.target_modules=[q, v, wo]"], 1.8),
    "lora-llama-unscanned": ("llama", False, ["lora.r=4", "lora.lora_alpha=8",
                                              "lora.target_modules=[q_proj, v_proj, down_proj]"], 0.45),
    "dora-t5-scanned": ("t5", True, ["lora.r=4", "lora.lora_alpha=8", "lora.target_modules=[q, v, wo]",
                                      "lora.use_dora=true"], 1.8),
    # Trained rows of the input embedding, which a tied head reads too (PEFT ties its token adapter to the head).
    "tokens-llama-tied-scanned": ("llama-tied", True, ["lora.r=4", "lora.lora_alpha=8", "lora.target_modules=[q_proj]",
                                                       "lora.trainable_token_indices=[3, 4, 5, 9, 300]"], 1.43),
    # On a T5 whose head is tied to shared (T5 v1.0): peft ties both stacks' embed_tokens and the head to the rows.
    "tokens-t5-tied-unscanned": ("t5-tied", False, ["lora.r=4", "lora.lora_alpha=8", "lora.target_modules=[q, wo]",
                                                    "lora.trainable_token_indices=[3, 4, 5, 9, 300]"], 0.56),
    # Rows of an untied head beside the input embedding's own (PEFT's dict form): peft wraps lm_head too.
    "tokens-llama-head-unscanned": ("llama", False, [
        "lora.r=4", "lora.lora_alpha=8", "lora.target_modules=[q_proj]",
        "lora.trainable_token_indices={embed_tokens: [3, 4, 5], lm_head: [3, 9, 300]}"], 0.34),
    "prompt-t5-scanned": ("t5", True, [f"prompt_tuning.num_virtual_tokens={VIRTUAL_TOKENS}"], 0.085),
    "prompt-llama-unscanned": ("llama", False, [f"prompt_tuning.num_virtual_tokens={VIRTUAL_TOKENS}"], 0.008),
}
SLOW = ("lora-llama-unscanned", "prompt-t5-scanned", "tokens-t5-tied-unscanned", "tokens-llama-head-unscanned")


# Each family and each adapter kind stays in the default suite once; the other two cases are `slow`.
@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in SLOW else case
                                  for case in CASES])
def test_adapter_training_steps_follow_peft_and_torch_adamw(pretrained, tmp_path, case):
    family, scan, adapter, clip = CASES[case]
    build, run_config, decoder_length = MODELS[family]
    family = family.split("-")[0]
    is_lora = not case.startswith("prompt")  # LoRA or DoRA
    # Adam's eps. DoRA's case takes a larger one: one of its A entries has a gradient of 6e-8 on its first
    # real step (the median is 2.5e-3), where eps=1e-8 turns float rounding into a 1e-4 difference in the update.
    eps = 1e-6 if case.startswith("dora") else 1e-8
    torch_model = build()
    torch_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    out = tmp_path / "run"
    no_dropout = ["model.dropout_rate=0.0"] if family == "t5" else []  # the decoder has none
    config = load_config(run_config, [
        "model={}", f"model.scan_layers={str(scan).lower()}", f"init_from={tmp_path / 'hf'}",
        f"data.tokenizer={pretrained / 'tokenizer'}", "data.packing=false", "data.encoder_length=128",
        f"data.decoder_length={decoder_length}", "train.batch_size=8", f"train.steps={STEPS}", "train.log_every_steps=1",
        "train.eval_every_steps=0", "train.rouge_every_steps=0", "train.export_hf=null", f"train.output_dir={out}",
        "checkpoint.async_save=false", f"checkpoint.every_steps={STEPS}", *adapter, *OPTIM, f"optim.eps={eps}",
        f"optim.clip_grad_norm={clip}", *no_dropout])

    # What the run will start from: its batches and its initial adapters, built as the loop builds them.
    resolved, loaded = resolve_init(config.for_devices(jax.device_count(), jax.process_count()))
    stage = stage_module("sft").build_stage(resolved, loaded)
    batches = [next(stage.train_data) for _ in range(STEPS)]
    tx, schedule = make_optimizer(resolved.optim, resolved.train.steps)
    mesh = sharding.make_mesh(resolved.mesh.data, resolved.mesh.fsdp, resolved.mesh.tensor)
    with sharding.activate(mesh):
        state, _ = init_train_state(stage.model, tx, stage.is_trainable, resolved.train.seed, mesh,
                                    params=stage.base.params, init_tree=stage.init_tree)
    key = ADAPTERS_KEY if is_lora else SOFT_PROMPT_KEY
    initial = jax.tree_util.tree_map(np.asarray, state.params[key])
    if is_lora:
        lora.save_pretrained(stage.model, initial, resolved.lora, tmp_path / "initial_adapter")
    else:
        prompt_tuning.save_pretrained(stage.model, initial, resolved.prompt_tuning, tmp_path / "initial_adapter")

    run_stage(config, progress=False)
    logged = [r for r in _metrics(out) if r["split"] == "train"]
    trained = read_checkpoint_params(out / "checkpoints", STEPS)[1][key]

    # The same steps in torch: peft's model from those adapters, AdamW with the run's schedule, torch's clipping.
    # (peft loads a prompt frozen, refusing is_trainable=True for prompt learning; it trains a prompt it made)
    model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "initial_adapter"), is_trainable=is_lora)
    if not is_lora:
        model.prompt_encoder.requires_grad_(True)
    model.eval()  # no dropout; gradients still flow
    params = [p for p in model.parameters() if p.requires_grad]
    # (peft's seq2seq prompt holds a second, unused block of rows: PROMPT_TUNING's format for two submodules)
    size = sum(a.size for a in jax.tree_util.tree_leaves(initial)) * (2 if case == "prompt-t5-scanned" else 1)
    assert sum(p.numel() for p in params) == size
    # llmjax decays matrices only (optim.decay_norms_and_biases: false), so DoRA's magnitude vectors, one number
    # per output channel like a norm's scale, take no weight decay: in torch, their own parameter group.
    vectors = [p for name, p in model.named_parameters() if p.requires_grad and "lora_magnitude_vector" in name]
    matrices = [p for p in params if all(p is not v for v in vectors)]
    groups = [{"params": matrices}] + ([{"params": vectors, "weight_decay": 0.0}] if vectors else [])
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=eps, weight_decay=0.1)
    losses, norms = [], []
    for step, batch in enumerate(batches):
        # (a peft decoder with a soft prompt returns the prompt's positions too)
        loss = torch_sft_loss(model, batch, seq2seq=family == "t5", skip=0 if is_lora else VIRTUAL_TOKENS)
        optimizer.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        losses.append(float(loss.detach()))
        for group in optimizer.param_groups:
            group["lr"] = float(schedule(step))
        optimizer.step()

    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in logged], losses, rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in logged], norms, rtol=1e-4)
    assert max(norms) > clip > min(norms), norms  # the clip bound on some steps and not on others

    model.save_pretrained(str(tmp_path / "peft_trained"))
    if is_lora:
        theirs = lora.from_pretrained(stage.model, tmp_path / "peft_trained")[0]
    else:
        theirs = prompt_tuning.from_pretrained(stage.model, tmp_path / "peft_trained")[0]
    moved = 0
    for (path, mine), other, start in zip(jax.tree_util.tree_leaves_with_path(trained),
                                          jax.tree_util.tree_leaves(theirs), jax.tree_util.tree_leaves(initial)):
        np.testing.assert_allclose(mine, other, rtol=0, atol=2e-5, err_msg=jax.tree_util.keystr(path))
        moved += not np.allclose(mine, start, atol=1e-3)
    assert moved == len(jax.tree_util.tree_leaves(trained))  # every leaf moved, by far more than the tolerance
