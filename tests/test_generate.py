"""``generate`` token-identical to ``transformers`` ``generate``: greedy and beam search, T5 v1.0/v1.1, LLaMA GQA.

Models: random small models from :mod:`tests.generation.models` (weights re-drawn at unit
scale so logits are decisive; seed 0 for every model, not searched for). Prompts: a batch
of three with lengths 9, 5 and 7 (T5 right-padded, LLaMA left-padded). The eos token is
taken from the model's own greedy output (the third new token of row 0), so rows finish at
different steps and the pad-after-eos path runs. Greedy tests also assert their premise:
every top-1 / top-2 logit gap along the path is larger than 1e-3, far above the ~1e-6
rounding differences between torch and XLA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmjax.generate import generate
from tests.generation.models import SMALL, prompts, small_model

LENGTHS = [9, 5, 7]
NEW = 10


def hf_generate(torch_model, ids, mask, **kwargs):
    with torch.inference_mode():
        return torch_model.generate(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)), **kwargs,
        )


@pytest.fixture(scope="module", params=sorted(SMALL))
def setup(request, tmp_path_factory):
    family, torch_model, model, params = small_model(request.param, 0, tmp_path_factory.mktemp(request.param))
    ids, mask = prompts(family, 1, LENGTHS, torch_model.config.vocab_size)
    prefix = 1 if family == "t5" else ids.shape[1]
    free_run = hf_generate(torch_model, ids, mask, max_new_tokens=NEW).numpy()
    eos = int(free_run[0, prefix + 2])
    return dict(name=request.param, torch=torch_model, model=model, params=params, ids=ids, mask=mask,
                prefix=prefix, eos=eos)


def assert_same(setup, **kwargs):
    ours = np.asarray(generate(setup["model"], setup["params"], setup["ids"], setup["mask"], **kwargs))
    reference = hf_generate(setup["torch"], setup["ids"], setup["mask"], **kwargs).numpy()
    assert ours.dtype == np.int32
    assert ours.shape == reference.shape, (ours, reference)
    np.testing.assert_array_equal(ours, reference)
    return ours


def test_greedy_matches_transformers(setup):
    settings = dict(max_new_tokens=NEW, eos_token_id=setup["eos"])
    out = assert_same(setup, **settings)
    new = out[:, setup["prefix"]:]
    ended = np.cumsum(new == setup["eos"], axis=1) > 0  # at or after the first eos
    assert ended[0].any() and not ended[:, -1].all(), "eos should end some rows, not all"
    after_eos = np.concatenate([np.zeros_like(ended[:, :1]), ended[:, :-1]], axis=1)
    assert (new[after_eos] == setup["torch"].generation_config.pad_token_id).all()

    # Premise: the path never depends on a near-tie.
    result = hf_generate(setup["torch"], setup["ids"], setup["mask"], output_scores=True,
                         return_dict_in_generate=True, **settings)
    for step, scores in enumerate(result.scores):
        open_rows = ~after_eos[:, step]
        top2 = torch.topk(scores[torch.from_numpy(open_rows)], 2).values.numpy()
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, f"near-tie at step {step}"


def test_beam_search_matches_transformers(setup):
    assert_same(setup, max_new_tokens=NEW, num_beams=3, eos_token_id=setup["eos"])


@pytest.mark.parametrize("model_name, settings", [
    ("llama_gqa", dict(num_beams=4, num_return_sequences=2, early_stopping=True, length_penalty=0.5)),
    ("llama_gqa", dict(num_beams=3, early_stopping="never", length_penalty=2.0)),
    ("t5_v1_0", dict(num_beams=3, length_penalty=-1.0, pad_token_id=5, min_new_tokens=2)),
])
def test_beam_search_options_match_transformers(model_name, settings, tmp_path):
    family, torch_model, model, params = small_model(model_name, 0, tmp_path)
    ids, mask = prompts(family, 1, LENGTHS, torch_model.config.vocab_size)
    prefix = 1 if family == "t5" else ids.shape[1]
    free_run = hf_generate(torch_model, ids, mask, max_new_tokens=NEW).numpy()
    eos = [int(free_run[0, prefix + 2]), int(free_run[1, prefix + 1])]
    setup = dict(torch=torch_model, model=model, params=params, ids=ids, mask=mask)
    assert_same(setup, max_new_tokens=NEW, eos_token_id=eos, **settings)


def test_min_new_tokens_suppresses_eos(setup):
    out = assert_same(setup, max_new_tokens=NEW, min_new_tokens=4, eos_token_id=setup["eos"])
    new = out[:, setup["prefix"]:]
    assert not (new[:, :4] == setup["eos"]).any()  # row 0 ends at its third token without it


def test_bad_inputs_get_clear_errors(setup):
    model, params, ids, mask = setup["model"], setup["params"], setup["ids"], setup["mask"]
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, length\].*input_ids\[None\]"):
        generate(model, params, ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="do_sample=True needs rng"):
        generate(model, params, ids, mask, max_new_tokens=2, do_sample=True)
    with pytest.raises(ValueError, match=r"ids outside \[0, 120\)"):
        generate(model, params, ids + 200, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, params, ids, mask[:, 1:], max_new_tokens=2)
    with pytest.raises(TypeError, match="did you mean 'num_beams'"):
        generate(model, params, ids, mask, num_beam=2)
    if model.config.__class__.__name__ == "DecoderConfig":
        with pytest.raises(ValueError, match="must be left-padded.*padding_side='left'"):
            generate(model, params, ids, mask[:, ::-1], max_new_tokens=2)


def test_default_mask_is_inferred_from_pad_like_transformers(setup):
    model, params, ids, mask = setup["model"], setup["params"], setup["ids"], setup["mask"]
    settings = dict(max_new_tokens=NEW, eos_token_id=setup["eos"])  # as the greedy test: no recompile
    explicit = generate(model, params, ids, mask, **settings)
    np.testing.assert_array_equal(generate(model, params, ids, **settings), explicit)
