"""The reward model's functional core: the classifier and Bradley-Terry losses equal hand formulas (numpy) on
fixed batches, padding rows (weight 0) count for nothing, rewards are the wanted logit, bad rows are clear errors."""

from functools import partial

import jax
import numpy as np
import pytest

from llmjax.data.tokenizer import train_tokenizer
from llmjax.errors import DataError
from llmjax.loading import HEADS_KEY
from llmjax.model_config import DecoderConfig, T5Config
from llmjax.models import build_model, init_params
from llmjax.models.heads import SCORE, init_head
from llmjax.rl.reward import (
    PAIR_PROMPT, classifier_batch, pair_prompt, pairwise_batch, reward_loss_fn, reward_scores, rows_batch,
)
from llmjax.rl.sequences import SequenceLengthError, final_hidden
from llmjax.rl_configs import RewardConfig, RLConfigError

T5 = T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, dropout_rate=0.0, dtype="float32")
DECODER = DecoderConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, dtype="float32")
TEXTS = ["you are a stupid idiot", "thanks for the help", "the parcel came late", "what a moron"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = TEXTS * 50 + [pair_prompt("#Person1#: hi #Person2#: the parcel came late, thanks")] * 50
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=48, num_extra_ids=0)


def _model(cfg, num_labels, seed=0):
    model = build_model(cfg)
    params = init_params(model, jax.random.key(seed))
    head = init_head(jax.random.key(seed + 1), 32, num_labels, std=0.5)
    return model, params, head


@partial(jax.jit, static_argnums=(0, 1))
def _compute(model, reward, params, head, batch):
    """One program: the stage's loss sums, ``final_hidden`` of each response side, and the rewards."""
    sides = [s for s in ("response", "chosen", "rejected") if f"{s}_ids" in batch]
    hidden = {side: final_hidden(model, params, {**batch, "response_ids": batch[f"{side}_ids"],
                                                 "response_mask": batch[f"{side}_mask"]}) for side in sides}
    rewards = reward_scores(model, params, head, reward, batch) if "response_ids" in batch else None
    return reward_loss_fn(model, reward)({**params, HEADS_KEY: {SCORE: head}}, batch, None), hidden, rewards


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("cfg", [T5, DECODER], ids=["t5", "decoder"])
def test_classifier_loss_is_the_weighted_cross_entropy_of_the_head_logits(tokenizer, cfg):
    reward = RewardConfig(kind="classifier", num_labels=3, wanted_label=2, response_length=32)
    model, params, head = _model(cfg, 3)
    batch = classifier_batch(model, tokenizer, TEXTS, reward, labels=[0, 2, 1, 2], weight=[1, 1, 1, 0])
    assert batch["prompt_ids"].shape == (4, 1) and batch["prompt_mask"].sum() == 4  # an empty prompt: eos / bos
    (loss, sums), hidden, rewards = _compute(model, reward, params, head, batch)

    # By hand: the hidden state final_hidden reads (checked against unpadded sequences in test_sequences), the
    # head and the cross-entropy in float64 numpy.
    hidden = np.asarray(hidden["response"], np.float64)
    logits = hidden @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
    nll = -_log_softmax(logits)[np.arange(4), [0, 2, 1, 2]]
    np.testing.assert_allclose(float(loss), nll[:3].sum(), rtol=1e-4)
    np.testing.assert_allclose(float(sums["loss"]), nll[:3].sum(), rtol=1e-4)
    assert float(sums["weights"]) == 3.0
    assert float(sums["accuracy"]) == float(np.sum((logits.argmax(1) == [0, 2, 1, 2])[:3]))
    # The reward is the wanted label's logit.
    np.testing.assert_allclose(rewards, logits[:, 2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", [T5, DECODER], ids=["t5", "decoder"])
def test_pairwise_loss_is_bradley_terry_on_the_chosen_and_rejected_scores(tokenizer, cfg):
    reward = RewardConfig(kind="pairwise", num_labels=1, wanted_label=0, prompt_length=160, response_length=32)
    model, params, head = _model(cfg, 1)
    prompts = [pair_prompt(t) for t in ("#Person1#: hi", "#Person2#: the parcel came late", "#Person1#: thanks")]
    chosen, rejected = TEXTS[1:4], [TEXTS[0], TEXTS[3], TEXTS[1]]
    batch = pairwise_batch(model, tokenizer, prompts, chosen, rejected, reward, weight=[1, 0, 1])
    (loss, sums), hidden, _ = _compute(model, reward, params, head, batch)

    def scores(side):
        return np.asarray(hidden[side], np.float64) @ np.asarray(head["kernel"], np.float64)[:, 0] + float(head["bias"][0])

    margin = scores("chosen") - scores("rejected")
    expected = np.log1p(np.exp(-margin))  # -log sigmoid(c - r)
    np.testing.assert_allclose(float(sums["loss"]), expected[[0, 2]].sum(), rtol=1e-4)
    assert float(loss) == float(sums["loss"]) and float(sums["weights"]) == 2.0
    assert float(sums["accuracy"]) == float(np.sum((margin > 0)[[0, 2]]))
    assert pair_prompt("X").startswith("Summarize the following conversation.") and PAIR_PROMPT.endswith("Summary: ")


def test_bad_configs_and_rows_are_clear_errors(tokenizer):
    with pytest.raises(RLConfigError, match="reward.kind=pairwise scores with one output; set reward.num_labels=1"):
        RewardConfig(kind="pairwise", num_labels=2)
    with pytest.raises(RLConfigError, match="reward.kind=classifier needs reward.num_labels >= 2"):
        RewardConfig(kind="classifier", num_labels=1)
    model, _, _ = _model(T5, 2)
    classifier = RewardConfig(response_length=32)
    with pytest.raises(DataError, match=r"rows, row 1: missing field\(s\) \['label'\]; reward.kind=classifier needs "
                                        r"rows with \['text', 'label'\]"):
        rows_batch(model, tokenizer, [{"text": "a", "label": 0}, {"text": "b"}], classifier, None, "rows")
    with pytest.raises(DataError, match=r"row 0: missing field\(s\) \['rejected'\]; reward.kind=pairwise"):
        rows_batch(model, tokenizer, [{"prompt": "a", "chosen": "b"}], RewardConfig(kind="pairwise", num_labels=1),
                   None, "rows")
    with pytest.raises(DataError, match=r"row 0: label 'nice' is not a class id in \[0, 2\) or one of"):
        rows_batch(model, tokenizer, [{"text": "a", "label": "nice"}], classifier, ("non_toxic", "toxic"), "rows")
    with pytest.raises(SequenceLengthError, match="text 0 has .* tokens .* over the 32 allowed"):
        classifier_batch(model, tokenizer, [" ".join(TEXTS * 4)], classifier)
