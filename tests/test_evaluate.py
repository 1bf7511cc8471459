"""Evaluation end to end on tiny random T5 and LLaMA models saved as Hugging Face directories.

References: scores come from llmjax.text_metrics (itself checked against rouge-score/sacrebleu) on the
produced predictions; batched outputs are checked against one-prompt-at-a-time `generate` calls on
unpadded ids; prompts against `llmjax.prompts.build_prompt` with `select_shots`.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from llmjax import hf, text_metrics
from llmjax.data.bundled.dialogsum import bundled_dialogsum
from llmjax.data.tokenizer import train_tokenizer
from llmjax.errors import InputError
from llmjax.evaluate import (
    build_prompts,
    compare_shots,
    encode_prompts,
    evaluate_dataset,
    generate_texts,
    load_generation_config,
    load_model_for_inference,
    new_tokens,
    prompt_ids,
    score_predictions,
    write_report,
)
from llmjax.generate import GenerationConfig, generate
from llmjax.loading import ModelPathError
from llmjax.models import build_model, init_params
from llmjax.models.decoder import DecoderConfig
from llmjax.models.t5 import T5Config
from llmjax.prompts import TEMPLATES, build_prompt, select_shots

VOCAB_SIZE = 160
GREEDY = GenerationConfig(max_new_tokens=6)


def tiny_config(family: str, vocab_size: int):
    if family == "t5":
        return T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                        num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    # T5-convention tokenizer: pad 0, eos 1; the decoder's bos is the eos id, as in GPT-2 style setups.
    return DecoderConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    # Plain dialogues only (no rude speaker): the soft-prompt test's check that a random tiny T5 answers
    # differently with a prompt holds for this tokenizer's pieces, not for every tokenizer.
    plain = [example for example in bundled_dialogsum("train") if not example["rude"]][:300]
    texts = [text for example in plain for text in (example["dialogue"], example["summary"])]
    train_tokenizer(texts, out, vocab_size=VOCAB_SIZE, num_extra_ids=0)
    return out


def save_model_dir(family: str, tokenizer_dir, out, seed: int = 0):
    """A random tiny model of `family` written as a HF directory with the tokenizer beside it."""
    from llmjax.data.tokenizer import Tokenizer

    model = build_model(tiny_config(family, VOCAB_SIZE))
    params = init_params(model, jax.random.key(seed))
    hf.save_pretrained(model, params, out)
    Tokenizer.load(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["t5", "decoder"])
def model_dir(request, tokenizer_dir, tmp_path_factory):
    return request.param, save_model_dir(request.param, tokenizer_dir, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def loaded(model_dir):
    family, path = model_dir
    return family, load_model_for_inference(path)


@pytest.fixture(scope="module")
def examples():
    return bundled_dialogsum("test")[:3]


def test_load_hf_dir_gives_saved_params_and_tokenizer(model_dir, loaded, tokenizer_dir):
    family, path = model_dir
    _, (model, params, tokenizer) = loaded
    _, expected = hf.from_pretrained(path)
    assert model.config == tiny_config(family, VOCAB_SIZE)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, expected))
    assert tokenizer.vocab_size == VOCAB_SIZE
    text = bundled_dialogsum("test")[0]["summary"]
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_load_checkpoint_and_run_dir(model_dir, loaded, tmp_path):
    from llmjax.train.checkpoint import import_hf_to_checkpoint

    _, path = model_dir
    _, (model, params, _) = loaded
    import_hf_to_checkpoint(path, tmp_path / "run" / "checkpoints")
    for where in (tmp_path / "run" / "checkpoints", tmp_path / "run"):
        got_model, got_params, tokenizer = load_model_for_inference(where)
        assert got_model.config == model.config
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, got_params, params))
        assert tokenizer.vocab_size == VOCAB_SIZE


def test_load_errors_name_the_problem(tmp_path, model_dir):
    with pytest.raises(ModelPathError, match="model directory .*missing does not exist"):
        load_model_for_inference(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match="neither a Hugging Face directory .* nor an llmjax checkpoint"):
        load_model_for_inference(tmp_path / "empty")
    _, path = model_dir
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((path / name).read_bytes())
    with pytest.raises(ModelPathError, match="has no spiece.model"):
        load_model_for_inference(no_tokenizer)


def test_generation_config_read_from_model_dir(tmp_path):
    assert load_generation_config(tmp_path) == GenerationConfig()
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"max_new_tokens": 7, "num_beams": 2, "eos_token_id": [1, 5], "transformers_version": "5.0"}))
    assert load_generation_config(tmp_path) == GenerationConfig(max_new_tokens=7, num_beams=2, eos_token_id=(1, 5))


def test_prompt_tokens_follow_each_family(loaded):
    family, (model, _, tokenizer) = loaded
    text = "Summarize: hello there."
    plain = tokenizer.encode(text, add_eos=False)
    assert prompt_ids(model, tokenizer, text) == (plain + [1] if family == "t5" else [1] + plain)

    short, long = "hi.", "Summarize the following conversation."
    ids, mask = encode_prompts(model, tokenizer, [short, long])
    assert ids.shape == mask.shape == (2, len(prompt_ids(model, tokenizer, long))) and ids.dtype == np.int32
    assert encode_prompts(model, tokenizer, [short], bucket=True)[0].shape == (1, 16)
    for text in (long, long * 3, long * 10):
        length = len(prompt_ids(model, tokenizer, text))
        bucket = encode_prompts(model, tokenizer, [text], bucket=True)[0].shape[1]
        assert length <= bucket < 2 * length and bucket & (bucket - 1) == 0  # the next power of two
    for row, text in enumerate([short, long]):
        expected = prompt_ids(model, tokenizer, text)
        tokens = ids[row][mask[row] == 1].tolist()
        assert tokens == expected
        assert (ids[row][mask[row] == 0] == 0).all()
        # decoder: pads before the prompt (left); T5: after it (right)
        positions = np.flatnonzero(mask[row])
        assert positions[-1 if family == "decoder" else 0] == (ids.shape[1] - 1 if family == "decoder" else 0)
        assert len(positions) == positions[-1] - positions[0] + 1


def test_new_tokens_cut_at_first_eos():
    sequences = np.array([[0, 5, 6, 1, 0], [0, 7, 1, 8, 1], [0, 9, 9, 9, 9]])
    assert new_tokens(sequences, 1, (1,)) == [[5, 6], [7], [9, 9, 9, 9]]
    assert new_tokens(sequences, 2, None) == [[6, 1, 0], [1, 8, 1], [9, 9, 9]]


def one_at_a_time(model, params, tokenizer, prompts, config):
    """Reference outputs: each prompt alone, unpadded, decoded by hand."""
    outputs = []
    for prompt in prompts:
        ids = np.asarray([prompt_ids(model, tokenizer, prompt)], np.int32)
        sequence = np.asarray(generate(model, params, ids, np.ones_like(ids), generation_config=config))[0]
        new = sequence[1:] if model.config.__class__ is T5Config else sequence[ids.shape[1]:]
        new = new.tolist()
        if 1 in new:
            new = new[: new.index(1)]
        outputs.append(tokenizer.decode(new).strip())
    return outputs


def test_batched_generation_equals_one_prompt_at_a_time(loaded):
    _, (model, params, tokenizer) = loaded
    # Lengths 2 to 14 tokens: one padded shape, so one compile for the batches.
    prompts = ["#Person1#: I will pay for the tickets.", "Hello", "Summary: Friday"]
    batched = generate_texts(model, params, tokenizer, prompts, generation_config=GREEDY, batch_size=2)
    assert batched == one_at_a_time(model, params, tokenizer, prompts, GREEDY)
    assert any(batched)  # a random model still writes something for some prompt


def test_prompts_use_template_and_seeded_shots(loaded, examples):
    _, (model, _, tokenizer) = loaded
    pool = bundled_dialogsum("train")[:20]
    prompts, kept = build_prompts(model, tokenizer, examples, "summarize", shots=2, shot_pool=pool,
                                  shot_seed=3, max_input_tokens=10_000)
    for example, prompt in zip(examples, prompts):
        assert prompt == build_prompt(TEMPLATES["summarize"], example, select_shots(pool, 2, 3, example["id"]))
    assert kept == [2, 2, 2]
    # The query itself is never its own shot, even when the pool is the evaluated set.
    prompts, kept = build_prompts(model, tokenizer, examples, "summarize", shots=2, max_input_tokens=10_000)
    for example, prompt in zip(examples, prompts):
        assert prompt.count(example["dialogue"]) == 1 and example["summary"] not in prompt
    # A tight budget drops shots first, then shortens the dialogue; the instruction stays.
    prompts, kept = build_prompts(model, tokenizer, examples, "summarize", shots=2, shot_pool=pool,
                                  max_input_tokens=60)
    assert kept == [0, 0, 0]
    for prompt in prompts:
        assert len(prompt_ids(model, tokenizer, prompt)) <= 60
        assert prompt.startswith("Summarize the following conversation.") and prompt.endswith("Summary: ")


def test_evaluate_scores_equal_metrics_on_its_predictions(loaded, examples):
    _, (model, params, tokenizer) = loaded
    result = evaluate_dataset(model, params, tokenizer, examples, "summarize", shots=1,
                              shot_pool=bundled_dialogsum("train")[:10], max_input_tokens=200,
                              generation_config=GREEDY, batch_size=4)
    references = [example.get("summaries", [example["summary"]]) for example in examples]
    assert result.references == references and result.ids == [e["id"] for e in examples]
    assert result.predictions == one_at_a_time(model, params, tokenizer, result.prompts[:1], GREEDY) + \
        generate_texts(model, params, tokenizer, result.prompts[1:], generation_config=GREEDY, batch_size=4)
    first = [example["summary"] for example in examples]

    def library_scores(refs):
        return {**text_metrics.rouge(result.predictions, refs), "bleu": text_metrics.bleu(result.predictions, refs),
                "exact_match": text_metrics.exact_match(result.predictions, refs)}

    assert result.scores == {**library_scores(references),
                             **{key + "_first_ref": value for key, value in library_scores(first).items()}}
    assert len(result.scores) == 12


def test_evaluate_generates_after_a_soft_prompt(loaded, examples):
    family, (model, params, tokenizer) = loaded
    soft_prompt = 3.0 * jax.random.normal(jax.random.key(1), (4, model.config.d_model if hasattr(model.config, "d_model")
                                                                else model.config.hidden_size))
    options = dict(max_input_tokens=200, generation_config=GREEDY, batch_size=4)
    plain = evaluate_dataset(model, params, tokenizer, examples, "summarize", **options)
    prompted = evaluate_dataset(model, params, tokenizer, examples, "summarize", soft_prompt=soft_prompt, **options)
    assert prompted.predictions == generate_texts(model, params, tokenizer, prompted.prompts, generation_config=GREEDY,
                                                  batch_size=4, soft_prompt=soft_prompt)
    if family == "t5":  # the random tiny decoder says the same words whatever comes first
        assert prompted.predictions != plain.predictions  # the prompt reached the model


def test_perfect_and_hand_checked_scores(examples):
    references = [example["summary"] for example in examples]
    perfect = score_predictions(references, references)
    ones = {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0, "bleu": 100.0, "exact_match": 1.0}
    assert perfect == pytest.approx({**ones, **{key + "_first_ref": value for key, value in ones.items()}}, abs=1e-9)
    # "the cat sat" vs "the cat ran": unigram P = R = 2/3; bigram 1/2; LCS 2 -> F 2/3.
    scores = score_predictions(["the cat sat", "b c d."], ["the cat ran", "B c d"])
    assert scores["rouge1"] == scores["rouge1_first_ref"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["rouge2"] == pytest.approx((1 / 2 + 1) / 2)
    assert scores["exact_match"] == 0.5


def test_scores_against_several_references():
    # The second reference "the cat sat" matches the first prediction exactly: all-reference ROUGE-1
    # is (1 + 1) / 2; against the first references only, (2/3 + 1) / 2 as above.
    scores = score_predictions(["the cat sat", "b c d."], [["the cat ran", "the cat sat"], ["B c d"]])
    assert scores["rouge1"] == pytest.approx(1.0) and scores["exact_match"] == 1.0
    assert scores["rouge1_first_ref"] == pytest.approx((2 / 3 + 1) / 2) and scores["exact_match_first_ref"] == 0.5
    assert scores["bleu"] > scores["bleu_first_ref"]


def test_compare_shots_and_report_files(loaded, examples, tmp_path):
    _, (model, params, tokenizer) = loaded
    options = dict(shot_pool=bundled_dialogsum("train")[:10], max_input_tokens=1000, generation_config=GREEDY,
                   batch_size=4)
    results = compare_shots(model, params, tokenizer, examples, "tldr", shot_counts=(0, 1), **options)
    assert list(results) == ["0-shot", "1-shot"]
    assert [r.shots for r in results.values()] == [0, 1]
    assert results["1-shot"].shots_kept == [1, 1, 1] and results["0-shot"].shots_kept == [0, 0, 0]
    single = evaluate_dataset(model, params, tokenizer, examples, "tldr", shots=1, **options)
    assert single.predictions == results["1-shot"].predictions and single.scores == results["1-shot"].scores

    settings = {"model": "tiny", "generation_config": GREEDY.to_hf()}
    paths = write_report(tmp_path / "report", examples, results, "tldr", settings, num_examples_shown=2)
    scores = json.loads(paths["scores"].read_text())
    assert scores["settings"] == {"model": "tiny", "generation_config": {"max_new_tokens": 6, **{
        k: v for k, v in GREEDY.to_hf().items() if k != "max_new_tokens"}}, "template": "tldr",
        "template_text": TEMPLATES["tldr"].template, "num_examples": 3}
    for name, result in results.items():
        assert scores["results"][name] == {"shots": result.shots, "mean_shots_kept": float(result.shots),
                                           "scores": result.scores}
    lines = paths["predictions"].read_text().splitlines()
    assert len(lines) == 6
    assert json.loads(lines[4]) == {"id": examples[1]["id"], "prompt": results["1-shot"].prompts[1],
                                    "reference": examples[1]["summary"],
                                    "references": examples[1].get("summaries", [examples[1]["summary"]]),
                                    "prediction": results["1-shot"].predictions[1], "setting": "1-shot"}

    report = paths["report"].read_text()
    assert report.startswith("# Evaluation report")
    table_rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert table_rows[0] == "| setting | references | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | BLEU | Exact match |"
    for row, (label, suffix) in zip(table_rows[1:3], (("all", ""), ("first", "_first_ref"))):
        scores = results["0-shot"].scores
        assert row == (f"| 0-shot | {label} | " + " | ".join(
            f"{scores[k + suffix]:.4f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
            + f" | {scores['bleu' + suffix]:.2f} | {scores['exact_match' + suffix]:.4f} |")
    assert table_rows[5] == "| id | input | reference | 0-shot | 1-shot |"
    example_rows = table_rows[6:]
    assert len(example_rows) == 2
    first = example_rows[0].split(" | ")
    assert first[0] == f"| {examples[0]['id']}"
    assert first[1].startswith(examples[0]["dialogue"].split("\n")[0]) and "<br>" in first[1]
    assert first[2] == examples[0]["summary"]


def test_report_cells_escape_markdown(tmp_path, examples):
    from llmjax.evaluate import EvalResult

    result = EvalResult(0, ["a"], ["p"], ["x | y\nz"], [["ref"]], [0], score_predictions(["x | y\nz"], ["ref"]))
    paths = write_report(tmp_path, [{"id": "a", "dialogue": "d | e", "summary": "ref"}], {"0-shot": result},
                         "summarize", {})
    assert "| a | d \\| e | ref | x \\| y<br>z |" in paths["report"].read_text()


def test_evaluate_errors(loaded, examples):
    _, (model, params, tokenizer) = loaded
    with pytest.raises(InputError, match="unknown prompt template 'nope'; choose one of summarize, "):
        evaluate_dataset(model, params, tokenizer, examples, "nope", generation_config=GREEDY)
    with pytest.raises(InputError, match="no examples to evaluate"):
        evaluate_dataset(model, params, tokenizer, [], "summarize", generation_config=GREEDY)
    with pytest.raises(InputError, match="cannot select 3 shots from 2 candidate examples"):
        evaluate_dataset(model, params, tokenizer, examples, "summarize", shots=3, generation_config=GREEDY)
    with pytest.raises(InputError, match="batch_size must be >= 1"):
        generate_texts(model, params, tokenizer, ["x"], generation_config=GREEDY, batch_size=0)
