"""GenerationConfig: Hugging Face names and defaults, validation messages, reading generation_config.json."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import transformers

from llmjax.errors import InputError, InputNotFoundError
from llmjax.generate import resolve_config
from llmjax.generation.config import HF_METADATA_KEYS, HF_UNSUPPORTED_KEYS, GenerationConfig
from llmjax.models import build_model
from llmjax.models.decoder import DecoderConfig
from llmjax.models.t5 import T5Config


def test_field_names_and_defaults_are_hugging_faces():
    defaults = transformers.GenerationConfig._get_default_generation_params()
    hf_keys = {k for k in transformers.GenerationConfig().to_dict() if not k.startswith("_")}
    ours = GenerationConfig()
    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    assert names <= hf_keys, f"not transformers names: {names - hf_keys}"
    for name in names - {"max_length"}:  # ours None means HF's 20, see new_tokens()
        if name in defaults:
            assert getattr(ours, name) == defaults[name], name
    # Every HF key is ours, metadata or a listed unsupported feature, and the lists hold only HF keys.
    ignored = HF_METADATA_KEYS | set(HF_UNSUPPORTED_KEYS)
    assert hf_keys - names - ignored == set()
    assert ignored - hf_keys <= {"_from_model_config"}


def test_eos_is_normalized_to_a_tuple():
    assert GenerationConfig(eos_token_id=3).eos_token_id == (3,)
    assert GenerationConfig(eos_token_id=[3, 4]).eos_token_id == (3, 4)
    assert GenerationConfig().eos_token_id is None
    hash(GenerationConfig(eos_token_id=[3, 4]))  # static argument of the jitted loop


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens=0 must be a positive integer"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5 must be a positive integer"),
    (dict(min_new_tokens=-1), "min_new_tokens=-1 must be an integer >= 0"),
    (dict(max_new_tokens=3, min_new_tokens=4), "min_new_tokens=4 exceeds max_new_tokens=3"),
    (dict(temperature=0.0), "temperature=0.0 must be a finite number > 0"),
    (dict(top_k=-1), "top_k=-1 must be an integer >= 0"),
    (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5 must be in (0, 1]"),
    (dict(num_beams=0), "num_beams=0 must be a positive integer"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0 must be a finite number > 0 (1.0 disables it"),
    (dict(repetition_penalty=-1.2), "repetition_penalty=-1.2 must be a finite number > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty=inf must be a finite number > 0"),
    (dict(repetition_penalty="1.2"), "repetition_penalty='1.2' must be a finite number > 0"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size=-1 must be an integer >= 0 (0 disables it"),
    (dict(no_repeat_ngram_size=2.0), "no_repeat_ngram_size=2.0 must be an integer >= 0"),
    (dict(no_repeat_ngram_size=True), "no_repeat_ngram_size=True must be an integer >= 0"),
    (dict(early_stopping="sometimes"), "early_stopping='sometimes' must be True, False or 'never'"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 cannot exceed num_beams=2"),
    (dict(num_return_sequences=2), "greedy decoding returns one sequence per prompt"),
    (dict(pad_token_id=-1), "pad_token_id=-1 must be a token id"),
    (dict(eos_token_id=[1, -2]), "eos_token_id=(1, -2) must hold token ids >= 0"),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(InputError, match="GenerationConfig: " + re.escape(message)):
        GenerationConfig(**kwargs)


def test_max_length_counts_the_prompt_like_hugging_face():
    assert GenerationConfig().new_tokens(prompt_length=5) == 15  # HF default max_length=20
    assert GenerationConfig(max_length=12).new_tokens(prompt_length=1) == 11
    assert GenerationConfig(max_length=12, max_new_tokens=4).new_tokens(prompt_length=9) == 4
    with pytest.raises(InputError, match="max_length=8 leaves no room after a prompt of 8 tokens"):
        GenerationConfig(max_length=8).new_tokens(prompt_length=8)


def test_from_hf_file_dir_and_dict(tmp_path):
    hf = transformers.GenerationConfig(
        max_new_tokens=7, do_sample=True, temperature=0.6, top_p=0.9, top_k=0, num_beams=1,
        eos_token_id=[2, 5], pad_token_id=0, decoder_start_token_id=0,
    )
    hf.save_pretrained(tmp_path)  # writes transformers_version etc. too
    expected = GenerationConfig(
        max_new_tokens=7, do_sample=True, temperature=0.6, top_p=0.9, top_k=0,
        eos_token_id=(2, 5), pad_token_id=0, decoder_start_token_id=0,
    )
    assert GenerationConfig.from_hf(tmp_path) == expected
    assert GenerationConfig.from_hf(tmp_path / "generation_config.json") == expected
    assert GenerationConfig.from_hf(json.loads((tmp_path / "generation_config.json").read_text())) == expected


def test_to_hf_round_trips_through_transformers(tmp_path):
    ours = GenerationConfig(max_new_tokens=9, num_beams=4, length_penalty=0.7, early_stopping="never",
                            eos_token_id=(1, 3), pad_token_id=0)
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps(ours.to_hf()))
    hf = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (hf.max_new_tokens, hf.num_beams, hf.length_penalty, hf.early_stopping, hf.eos_token_id) == (
        9, 4, 0.7, "never", [1, 3])
    assert GenerationConfig.from_hf(tmp_path) == ours


def test_repetition_settings_round_trip_through_transformers_files(tmp_path):
    hf = transformers.GenerationConfig(max_new_tokens=6, num_beams=2, repetition_penalty=1.3, no_repeat_ngram_size=3)
    hf.save_pretrained(tmp_path)
    ours = GenerationConfig.from_hf(tmp_path)
    assert (ours.repetition_penalty, ours.no_repeat_ngram_size, ours.num_beams) == (1.3, 3, 2)
    (tmp_path / "generation_config.json").write_text(json.dumps(ours.to_hf()))
    back = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (back.repetition_penalty, back.no_repeat_ngram_size) == (1.3, 3)
    assert GenerationConfig.from_hf(tmp_path) == ours
    with pytest.raises(InputError, match="no_repeat_ngram_size=-2 must be an integer >= 0"):
        GenerationConfig.from_hf({"no_repeat_ngram_size": -2})


def test_from_hf_warns_on_unsupported_settings_and_rejects_unknown_keys():
    with pytest.warns(UserWarning, match=r"does not implement encoder_repetition_penalty=1.2, typical_p=0.9"):
        config = GenerationConfig.from_hf(
            {"max_new_tokens": 5, "encoder_repetition_penalty": 1.2, "typical_p": 0.9, "bos_token_id": 1})
    assert config.max_new_tokens == 5
    with pytest.raises(InputError, match="unknown key 'max_new_token'; did you mean 'max_new_tokens'"):
        GenerationConfig.from_hf({"max_new_token": 5})
    with pytest.raises(InputNotFoundError, match="expected a generation_config.json"):
        GenerationConfig.from_hf("/nonexistent/dir")


def test_resolve_config_fills_token_ids_from_the_model():
    t5 = build_model(T5Config(vocab_size=50, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    config = resolve_config(t5, max_new_tokens=3)
    assert (config.eos_token_id, config.pad_token_id, config.decoder_start_token_id) == ((1,), 0, 0)
    decoder = build_model(DecoderConfig(vocab_size=50, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, eos_token_id=2, pad_token_id=0))
    explicit = GenerationConfig(eos_token_id=7)
    config = resolve_config(decoder, explicit, pad_token_id=None, top_k=3)
    assert (config.eos_token_id, config.pad_token_id, config.top_k) == ((7,), 0, 3)
    with pytest.raises(TypeError, match="unknown generation argument 'max_tokens'; did you mean 'max_new_tokens'"):
        resolve_config(decoder, max_tokens=3)

