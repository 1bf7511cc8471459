"""Prompt tuning (``llmjax.prompt_tuning`` and the models' ``soft_prompt=``) against Hugging Face ``peft``:
a PROMPT_TUNING dir that peft wrote gives peft's logits in llmjax, one llmjax wrote gives llmjax's logits
in peft (T5 and LLaMA, layers scanned and not); generation with the KV cache decodes what peft decodes;
PEFT's init rules; bad input is refused with a clear error."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llmjax.hf
from llmjax import prompt_tuning
from llmjax.config import CONFIGS_DIR, ConfigError, load_config
from llmjax.generate import generate
from llmjax.hf.io import CheckpointError
from llmjax.prompt_tuning import PromptTuningConfig, PromptTuningError
from tests.generation.models import SMALL, prompts, small_model

peft = pytest.importorskip("peft")

N = 4  # virtual tokens
FAMILIES = {"t5_v1_1": "SEQ_2_SEQ_LM", "llama_gqa": "CAUSAL_LM"}
LAYOUTS = pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])


@pytest.fixture(scope="module", params=list(FAMILIES))
def models(request, tmp_path_factory):
    """``(name, hf_dir, peft_dir, {scan_layers: (model, params)})``: a small random HF model saved to disk
    and a PEFT prompt-tuning dir that peft wrote for it (RANDOM init: N(0, 1) rows)."""
    name = request.param
    directory = tmp_path_factory.mktemp(name)
    _, torch_model, model, params = small_model(name, 3, directory / "hf", scan_layers=True)
    unrolled, unrolled_params = llmjax.hf.from_pretrained(directory / "hf", scan_layers=False)
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(torch_model, peft.PromptTuningConfig(task_type=FAMILIES[name],
                                                                       num_virtual_tokens=N))
    wrapped.save_pretrained(directory / "peft")
    return name, directory / "hf", directory / "peft", {True: (model, params), False: (unrolled, unrolled_params)}


def _peft_model(hf_dir, adapter_dir, seq2seq: bool):
    import transformers

    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    return peft.PeftModel.from_pretrained(auto.from_pretrained(hf_dir), adapter_dir).eval()


def _inputs(name):
    """Model inputs with padding in one row: T5 (ids, mask, decoder ids), LLaMA right-padded (ids, mask)."""
    vocab = SMALL[name][1]["vocab_size"]
    rng = np.random.default_rng(5)
    ids = rng.integers(2, vocab, size=(2, 7)).astype(np.int32)
    mask = np.array([[1] * 7, [1] * 5 + [0] * 2], np.int32)
    decoder = rng.integers(2, vocab, size=(2, 5)).astype(np.int32)
    decoder[:, 0] = 0
    return ids * mask, mask, decoder


def _logits_pair(name, model, params, soft_prompt, peft_model):
    """(llmjax logits, peft logits) on the real tokens' valid positions."""
    ids, mask, decoder = _inputs(name)
    seq2seq = name.startswith("t5")
    with torch.no_grad():
        if seq2seq:
            ref = peft_model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                             decoder_input_ids=torch.tensor(decoder).long()).logits.numpy()
            ours = model.apply({"params": params}, ids, decoder, mask, soft_prompt=soft_prompt)
            return np.asarray(ours), ref
        ref = peft_model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits.numpy()
    ref = ref[:, N:]  # peft returns the virtual tokens' logits too; the decoder returns the real tokens' only
    ours = np.asarray(model.apply({"params": params}, ids, mask, soft_prompt=soft_prompt))
    valid = mask.astype(bool)  # right padding: HF counts positions through the pads, llmjax over real tokens
    return ours[valid], ref[valid]


@LAYOUTS
def test_a_peft_written_prompt_gives_peft_logits(models, scan_layers):
    name, hf_dir, peft_dir, built = models
    model, params = built[scan_layers]
    soft_prompt, cfg = prompt_tuning.from_pretrained(model, peft_dir)
    assert soft_prompt.shape == (N, model.config.d_model if name.startswith("t5") else model.config.hidden_size)
    assert cfg == PromptTuningConfig(num_virtual_tokens=N)
    ours, ref = _logits_pair(name, model, params, soft_prompt, _peft_model(hf_dir, peft_dir, name.startswith("t5")))
    assert np.abs(ours - ref).max() <= 1e-4


@LAYOUTS
def test_an_llmjax_written_prompt_gives_llmjax_logits_in_peft(models, scan_layers, tmp_path):
    name, hf_dir, _, built = models
    model, params = built[scan_layers]
    cfg = PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB")
    soft_prompt = prompt_tuning.init(model, params, cfg, jax.random.key(1))
    soft_prompt = soft_prompt + 0.3 * jax.random.normal(jax.random.key(2), soft_prompt.shape)  # "trained"
    prompt_tuning.save_pretrained(model, soft_prompt, cfg, tmp_path / "pt", base_model_name_or_path=str(hf_dir))
    written = json.loads((tmp_path / "pt" / "adapter_config.json").read_text())
    assert written["peft_type"] == "PROMPT_TUNING" and written["task_type"] == FAMILIES[name]
    peft_model = _peft_model(hf_dir, tmp_path / "pt", name.startswith("t5"))
    ours, ref = _logits_pair(name, model, params, soft_prompt, peft_model)
    assert np.abs(ours - ref).max() <= 1e-4
    plain, _ = _logits_pair(name, model, params, None, peft_model)
    assert np.abs(plain - ref).max() > 1e-2  # the prompt matters
    again, cfg_again = prompt_tuning.from_pretrained(model, tmp_path / "pt")
    np.testing.assert_array_equal(again, np.asarray(soft_prompt))
    assert cfg_again == cfg


def test_seq2seq_dirs_hold_two_submodules_and_only_the_first_rows_reach_the_encoder(models, tmp_path):
    """PEFT's SEQ_2_SEQ_LM layout: ``num_virtual_tokens * 2`` rows, the first ``n`` before the encoder input."""
    name, _, peft_dir, built = models
    model, params = built[True]
    from safetensors.numpy import load_file

    stored = load_file(str(peft_dir / "adapter_model.safetensors"))["prompt_embeddings"]
    submodules = 2 if name.startswith("t5") else 1
    assert stored.shape[0] == N * submodules
    soft_prompt, _ = prompt_tuning.from_pretrained(model, peft_dir)
    np.testing.assert_array_equal(soft_prompt, stored[:N])


def _peft_greedy(peft_model, ids, mask, seq2seq: bool, new_tokens: int):
    """peft's greedy continuation (eos suppressed, as ``min_new_tokens``). T5: ``peft.generate``. LLaMA: the
    full peft forward re-run per token, because peft 0.21's cached generate for a CAUSAL_LM prompt-tuning model
    departs from its own forward after the first new token (checked: the forward re-run and llmjax agree)."""
    ids, mask = torch.tensor(ids).long(), torch.tensor(mask).long()
    with torch.no_grad():
        if seq2seq:
            return peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False).numpy()
        eos = peft_model.config.eos_token_id
        for _ in range(new_tokens):
            logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, -1]
            logits[:, eos] = -float("inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids.numpy()


def test_generation_with_a_soft_prompt_decodes_what_peft_decodes(models):
    """Greedy decoding with the KV cache (soft prompt in the encoder input / the decoder's first cache slots)
    equals peft's on prompts without padding; a left-padded decoder prompt decodes as the prompt alone."""
    name, hf_dir, peft_dir, built = models
    model, params = built[True]
    seq2seq = name.startswith("t5")
    soft_prompt, _ = prompt_tuning.from_pretrained(model, peft_dir)
    family = "t5" if seq2seq else "decoder"
    ids, mask = prompts(family, 7, [6, 6], model.config.vocab_size)
    ref = _peft_greedy(_peft_model(hf_dir, peft_dir, seq2seq), ids, mask, seq2seq, 8)
    ours = np.asarray(generate(model, params, ids, mask, soft_prompt=soft_prompt, max_new_tokens=8, min_new_tokens=8))
    np.testing.assert_array_equal(ours, ref)
    if not seq2seq:
        # llmjax keeps HF's padding-free positions (cumsum of the mask, virtual tokens first), so a padded row
        # decodes exactly as the same prompt alone (peft's generate counts positions through the pads).
        padded, pad_mask = prompts(family, 7, [4, 6], model.config.vocab_size)
        both = np.asarray(generate(model, params, padded, pad_mask, soft_prompt=soft_prompt, max_new_tokens=6))
        alone = np.asarray(generate(model, params, padded[:1, 2:], pad_mask[:1, 2:], soft_prompt=soft_prompt,
                                    max_new_tokens=6))
        np.testing.assert_array_equal(both[0, 2:], alone[0])


def test_a_batched_soft_prompt_is_one_prompt_per_row(models):
    name, _, peft_dir, built = models
    model, params = built[False]
    soft_prompt, _ = prompt_tuning.from_pretrained(model, peft_dir)
    ids, mask, decoder = _inputs(name)
    call = ((lambda sp: model.apply({"params": params}, ids, decoder, mask, soft_prompt=sp)) if name.startswith("t5")
            else (lambda sp: model.apply({"params": params}, ids, mask, soft_prompt=sp)))
    other = soft_prompt[::-1]
    rows = np.asarray(call(np.stack([soft_prompt, other])))
    np.testing.assert_allclose(rows[0], np.asarray(call(soft_prompt))[0], atol=1e-6)
    np.testing.assert_allclose(rows[1], np.asarray(call(other))[1], atol=1e-6)


def test_inits_follow_peft():
    model, params = _tiny_t5()
    embedding = np.asarray(params["shared"]["embedding"])
    random = prompt_tuning.init(model, params, PromptTuningConfig(num_virtual_tokens=512), jax.random.key(0))
    assert random.shape == (512, 32) and random.dtype == jnp.float32
    assert abs(float(random.std()) - 1.0) < 0.02 and abs(float(random.mean())) < 0.02  # N(0, 1), torch Embedding
    sampled = np.asarray(prompt_tuning.init(model, params, PromptTuningConfig(num_virtual_tokens=6,
                                            prompt_tuning_init="SAMPLE_VOCAB"), jax.random.key(0)))
    assert all((embedding == row).all(axis=1).any() for row in sampled)  # every row is a vocabulary row

    class Words:  # a tokenizer: one id per word
        def encode(self, text, add_eos=True):
            return [10 + len(word) for word in text.split()] + ([1] if add_eos else [])

    text = PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text="a bb ccc")
    ids = [11, 12, 13, 1]  # T5 tokenizes like HF: text + eos; repeated to 7 rows, as PEFT does
    np.testing.assert_array_equal(prompt_tuning.init(model, params, text, jax.random.key(0), Words()),
                                  embedding[(ids * 2)[:7]])
    short = PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="a bb ccc")
    np.testing.assert_array_equal(prompt_tuning.init(model, params, short, jax.random.key(0), Words()), embedding[ids[:2]])


def _tiny_t5():
    from llmjax.model_config import T5Config
    from llmjax.models import build_model, init_params

    model = build_model(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    return model, init_params(model, jax.random.key(0))


def test_bad_configs_prompts_and_dirs_are_refused(tmp_path):
    with pytest.raises(PromptTuningError, match="num_virtual_tokens must be an integer >= 1"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(PromptTuningError, match="TEXT needs prompt_tuning.prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT")
    with pytest.raises(PromptTuningError, match="only read with prompt_tuning_init=TEXT"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init_text="hello")
    with pytest.raises(PromptTuningError, match="'WORDS' is unknown"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="WORDS")

    model, params = _tiny_t5()
    cfg = PromptTuningConfig(num_virtual_tokens=3)
    with pytest.raises(PromptTuningError, match=r"soft_prompt has shape \(3, 16\); .* \[num_virtual_tokens=3, d_model=32\]"):
        prompt_tuning.save_pretrained(model, np.zeros((3, 16)), cfg, tmp_path / "x")
    with pytest.raises(PromptTuningError, match="NaN or inf"):
        prompt_tuning.save_pretrained(model, np.full((3, 32), np.nan), cfg, tmp_path / "x")
    with pytest.raises(ValueError, match=r"soft_prompt must be \[n, d_model=32\]"):
        model.apply({"params": params}, np.ones((1, 4), np.int32), np.ones((1, 2), np.int32), soft_prompt=np.ones((3, 8)))
    with pytest.raises(ValueError, match="cannot be combined with packing"):
        model.apply({"params": params}, np.ones((1, 4), np.int32), np.ones((1, 2), np.int32), soft_prompt=np.ones((3, 32)),
                    encoder_segment_ids=np.ones((1, 4), np.int32), decoder_segment_ids=np.ones((1, 2), np.int32))

    good = tmp_path / "good"
    prompt_tuning.save_pretrained(model, np.ones((3, 32), np.float32), cfg, good)
    config = json.loads((good / "adapter_config.json").read_text())

    def variant(name, **changes):
        import shutil

        out = tmp_path / name
        shutil.copytree(good, out)
        (out / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return out

    with pytest.raises(CheckpointError, match="no such directory"):
        prompt_tuning.from_pretrained(model, tmp_path / "missing")
    with pytest.raises(PromptTuningError, match="peft_type is 'LORA', not 'PROMPT_TUNING'"):
        prompt_tuning.from_pretrained(model, variant("lora", peft_type="LORA"))
    with pytest.raises(PromptTuningError, match="task_type is 'CAUSAL_LM' but this model is a SEQ_2_SEQ_LM"):
        prompt_tuning.from_pretrained(model, variant("causal", task_type="CAUSAL_LM"))
    with pytest.raises(PromptTuningError, match="token_dim=64 but the model's embeddings are 32 wide"):
        prompt_tuning.from_pretrained(model, variant("wide", token_dim=64))
    with pytest.raises(PromptTuningError, match=r"prompt_embeddings has shape \(6, 32\); .* = 8, 32\]"):
        prompt_tuning.from_pretrained(model, variant("rows", num_virtual_tokens=4))
    pickled = variant("pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="will not unpickle an adapter"):
        prompt_tuning.from_pretrained(model, pickled)

    # The run config: the section's keys are checked, and it cannot pack rows or join lora.
    sft = CONFIGS_DIR / "sft_t5_tiny.yaml"
    with pytest.raises(ConfigError, match=r"'prompt_tuning.num_tokens' \(did you mean 'prompt_tuning.num_virtual_tokens'"):
        load_config(sft, ["prompt_tuning.num_tokens=4"])
    with pytest.raises(ConfigError, match="set data.packing=false"):
        load_config(sft, ["prompt_tuning.num_virtual_tokens=4"])
    with pytest.raises(ConfigError, match="lora and prompt_tuning are both set"):
        load_config(sft, ["prompt_tuning.num_virtual_tokens=4", "data.packing=false", "lora.r=4",
                          "lora.lora_alpha=8", "lora.target_modules=[q]"])
    loaded = load_config(sft, ["prompt_tuning.num_virtual_tokens=4", "prompt_tuning.prompt_tuning_init=SAMPLE_VOCAB",
                               "data.packing=false"])
    assert loaded.prompt_tuning == PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB")
    shipped = load_config(CONFIGS_DIR / "sft_t5_tiny_prompt_tuning.yaml")
    assert shipped.prompt_tuning.prompt_tuning_init == "TEXT" and shipped.stage == "sft" and not shipped.data.packing


def test_throughput_counts_the_virtual_tokens():
    from types import SimpleNamespace

    from llmjax.models import step_flops
    from llmjax.train.loop import _throughput

    config = load_config(CONFIGS_DIR / "sft_t5_tiny_prompt_tuning.yaml")
    throughput = _throughput(SimpleNamespace(model=SimpleNamespace(config=config.model)), config, 1.0)
    batch, n, data = config.train.batch_size, config.prompt_tuning.num_virtual_tokens, config.data
    assert throughput.tokens_per_step == batch * (data.encoder_length + n + data.decoder_length)
    assert throughput.flops_per_step == step_flops(config.model, batch, data.decoder_length,
                                                   data.encoder_length + n).total
