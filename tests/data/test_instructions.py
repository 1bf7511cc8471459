"""Instruction formatting: wordings, formats and the response-only loss mask, on hand-checked token ids."""

import numpy as np
import pytest

from llmjax.prompts import TEMPLATES as EVAL_PROMPTS

from llmjax.data.instructions import (
    TEMPLATE_SETS,
    InstructionDataError,
    Wording,
    chat_pieces,
    choose_wording,
    encode_pieces,
    load_templates,
    make_formatter,
    template_pieces,
)

EOS, BOS = 1, 2


def encode(text):
    """A character-level stand-in for a tokenizer: one id per character, so masks are checked by eye."""
    return [ord(c) for c in text]


def trained_text(features):
    """The target characters that carry loss (eos shown as '|')."""
    targets = features["decoder_target_tokens"][features["decoder_loss_weights"] == 1]
    return "".join("|" if t == EOS else chr(t) for t in targets)


def test_dialogsum_wordings_include_the_course_prompts():
    prompts = [w.prompt for w in TEMPLATE_SETS["dialogsum"]]
    assert "Summarize the following conversation.\n\n{dialogue}\n\nSummary: " in prompts
    assert "Dialogue:\n\n{dialogue}\n\nWhat was going on?\n" in prompts
    # Tuned on the very text evaluation prompts with (data/ does not import prompts.py; this keeps them equal).
    assert {EVAL_PROMPTS["summarize"].template, EVAL_PROMPTS["what_happened"].template} <= set(prompts)
    assert len(set(prompts)) == 7 and all(w.response == "{summary}" for w in TEMPLATE_SETS["dialogsum"])


def test_template_rendering():
    wording = Wording("Q: {question}\nA: ", "{answer}!")
    assert template_pieces({"question": "2+2?", "answer": "4", "x": 0}, wording) == [("Q: 2+2?\nA: ", False), ("4!", True)]
    with pytest.raises(KeyError, match=r"needs field\(s\) \['answer'\]"):
        template_pieces({"question": "2+2?"}, wording)


def test_wording_choice_is_uniform_and_fixed_by_the_generator():
    wordings = TEMPLATE_SETS["dialogsum"]
    picks = [choose_wording(wordings, np.random.default_rng([0, 0, i])) for i in range(2000)]
    again = [choose_wording(wordings, np.random.default_rng([0, 0, i])) for i in range(2000)]
    other_seed = [choose_wording(wordings, np.random.default_rng([1, 0, i])) for i in range(2000)]
    assert picks == again and picks != other_seed
    counts = np.array([picks.count(w) for w in wordings])
    # Uniform over 7 wordings: ~286 each, binomial sd ~16.
    assert np.all(np.abs(counts - 2000 / 7) < 70), counts


def test_alpaca_uses_the_input_section_only_when_there_is_an_input():
    formatter, fields = make_formatter("alpaca")
    assert fields == {"instruction", "output"}
    rng = np.random.default_rng(0)
    with_input = formatter({"instruction": "Add.", "input": "2 3", "output": "5"}, rng)
    without = formatter({"instruction": "Say hi.", "input": " ", "output": "hi"}, rng)
    assert with_input[0][0] in {"### Instruction:\nAdd.\n\n### Input:\n2 3\n\n### Response:\n", "Task: Add.\nInput: 2 3\nAnswer: "}
    assert without[0][0] in {"### Instruction:\nSay hi.\n\n### Response:\n", "Task: Say hi.\nAnswer: "}
    assert with_input[1] == ("5", True) and without[1] == ("hi", True)


def test_seq2seq_loss_covers_exactly_the_decoder_targets():
    features = encode_pieces([("ab", False), ("cd", True)], encode, batch_format="seq2seq", eos_id=EOS)
    np.testing.assert_array_equal(features["encoder_input_tokens"], [97, 98, EOS])
    np.testing.assert_array_equal(features["decoder_input_tokens"], [0, 99, 100])
    np.testing.assert_array_equal(features["decoder_target_tokens"], [99, 100, EOS])
    np.testing.assert_array_equal(features["decoder_loss_weights"], [1, 1, 1])


def test_decoder_loss_covers_exactly_the_response_after_the_prompt():
    features = encode_pieces([("ab", False), ("cd", True)], encode, batch_format="causal", eos_id=EOS, bos_id=BOS)
    np.testing.assert_array_equal(features["decoder_input_tokens"], [BOS, 97, 98, 99, 100])
    np.testing.assert_array_equal(features["decoder_target_tokens"], [97, 98, 99, 100, EOS])
    np.testing.assert_array_equal(features["decoder_loss_weights"], [0, 0, 1, 1, 1])


def test_chat_loss_mask_covers_exactly_the_assistant_tokens():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
        {"role": "user", "content": "unanswered"},  # nothing to learn after it: dropped
    ]
    pieces = chat_pieces(messages)
    text = "".join(piece for piece, _ in pieces)
    assert text == "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Bye\nAssistant: Ciao"
    features = encode_pieces(pieces, encode, batch_format="causal", eos_id=EOS, bos_id=BOS)
    assert trained_text(features) == "Hello|Ciao|"
    # Position by position: weight 1 exactly where the target is an assistant character or its closing eos.
    full = [BOS] + encode("System: Be brief.\nUser: Hi\nAssistant: ") + encode("Hello") + [EOS] \
        + encode("\nUser: Bye\nAssistant: ") + encode("Ciao") + [EOS]
    np.testing.assert_array_equal(features["decoder_target_tokens"], full[1:])
    start1 = len("System: Be brief.\nUser: Hi\nAssistant: ")
    start2 = start1 + len("Hello") + 1 + len("\nUser: Bye\nAssistant: ")
    expected = np.zeros(len(full) - 1, np.int32)
    expected[start1:start1 + 6] = 1  # "Hello" + eos, as targets of the positions before them
    expected[start2:start2 + 5] = 1  # "Ciao" + eos
    np.testing.assert_array_equal(features["decoder_loss_weights"], expected)


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "Hi"}], "no assistant turn"),
    ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}], "system turn may only come first"),
    ([{"role": "bot", "content": "Hi"}], "role 'bot' is not one of"),
    ([{"role": "user"}], "expected a mapping with role and content"),
    ("Hi", "non-empty list"),
])
def test_malformed_chats_are_named(messages, error):
    with pytest.raises(InstructionDataError, match=error):
        chat_pieces(messages)


def test_multi_turn_chat_is_for_decoders():
    pieces = chat_pieces([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])
    with pytest.raises(InstructionDataError, match="for decoder-only models"):
        encode_pieces(pieces, encode, batch_format="seq2seq", eos_id=EOS)
    single = encode_pieces(pieces[:2], encode, batch_format="seq2seq", eos_id=EOS)  # one exchange works for T5
    np.testing.assert_array_equal(single["decoder_target_tokens"], [ord("b"), EOS])
    assert "".join(map(chr, single["encoder_input_tokens"][:-1])) == "User: a\nAssistant: "


def test_wordings_file(tmp_path):
    path = tmp_path / "qa.yaml"
    path.write_text("- {prompt: 'Q: {q}', response: '{a}'}\n- {prompt: 'Question: {q}', response: '{a}'}\n")
    assert load_templates(path) == (Wording("Q: {q}", "{a}"), Wording("Question: {q}", "{a}"))
    formatter, fields = make_formatter(str(path))
    assert fields == {"q", "a"}
    assert formatter({"q": "x", "a": "y"}, np.random.default_rng(0))[1] == ("y", True)
    path.write_text("- {prompt: 'Q: {q}'}\n")
    with pytest.raises(InstructionDataError, match="expected keys prompt and response"):
        load_templates(path)
    with pytest.raises(InstructionDataError, match="unknown template set 'dialogsumm'"):
        make_formatter("dialogsumm")


def test_registered_template_sets(monkeypatch):
    from llmjax.data import instructions

    monkeypatch.setattr(instructions, "TEMPLATE_SETS", dict(TEMPLATE_SETS))  # leave the real registry alone
    instructions.register_templates("qa_test", [("Q: {q}", "{a}"), Wording("Question: {q}\n", "{a}")])
    formatter, fields = make_formatter("qa_test")
    assert fields == {"q", "a"}
    assert formatter({"q": "x", "a": "y"}, np.random.default_rng(0))[0][0] in {"Q: x", "Question: x\n"}
    with pytest.raises(InstructionDataError, match="'qa_test' already exists"):
        instructions.register_templates("qa_test", [("{q}", "{a}")])
    with pytest.raises(InstructionDataError, match="names no example field"):
        instructions.register_templates("constant", [("{q}", "yes")])
