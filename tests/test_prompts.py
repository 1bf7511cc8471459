"""Prompt building: exact zero/one/few-shot strings, budgets that drop shots then cut the dialogue, shot selection."""

import re

import pytest

from llmjax.errors import DataError, InputError
from llmjax.prompts import TEMPLATES, PromptTemplate, build_prompt, fit_prompt, select_shots

SHOT_A = {"id": "a", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet."}
SHOT_B = {"id": "b", "dialogue": "#Person1#: Tea?\n#Person2#: Yes.", "summary": "#Person2# wants tea."}
QUERY = {"id": "q", "dialogue": "#Person1#: Bye.\n#Person2#: See you.", "summary": "They part."}


def count_words(text: str) -> int:
    return len(text.split())


def test_zero_shot_exact():
    assert build_prompt("summarize", QUERY) == (
        "Summarize the following conversation.\n\n#Person1#: Bye.\n#Person2#: See you.\n\nSummary: ")


def test_one_shot_exact():
    assert build_prompt("what_happened", QUERY, [SHOT_A]) == (
        "Dialogue:\n\n#Person1#: Hi.\n#Person2#: Hello.\n\nWhat was going on?\nThey greet.\n\n\n"
        "Dialogue:\n\n#Person1#: Bye.\n#Person2#: See you.\n\nWhat was going on?\n")


def test_few_shot_exact_with_custom_template():
    template = PromptTemplate("qa", "Q: {dialogue}\nA: ", shot_separator="\n---\n")
    assert build_prompt(template, QUERY, [SHOT_A, SHOT_B]) == (
        "Q: #Person1#: Hi.\n#Person2#: Hello.\nA: They greet.\n---\n"
        "Q: #Person1#: Tea?\n#Person2#: Yes.\nA: #Person2# wants tea.\n---\n"
        "Q: #Person1#: Bye.\n#Person2#: See you.\nA: ")


def test_every_bundled_template_renders_the_dialogue_once():
    for template in TEMPLATES.values():
        assert build_prompt(template, QUERY).count(QUERY["dialogue"]) == 1


def test_budget_drops_last_shots_first():
    full = build_prompt("summarize", QUERY, [SHOT_A, SHOT_B])
    one_shot = build_prompt("summarize", QUERY, [SHOT_A])
    fitted = fit_prompt(TEMPLATES["summarize"], QUERY, [SHOT_A, SHOT_B], count_tokens=count_words,
                        max_tokens=count_words(full) - 1)
    assert fitted.text == one_shot and fitted.num_shots == 1 and fitted.words_removed == 0


LONG_QUERY = {"id": "long", "dialogue": "\n".join(f"#Person{1 + i % 2}#: word{i} filler text here." for i in range(40))}


@pytest.mark.parametrize("truncate_from", ["middle", "end"])
def test_truncation_keeps_instruction_and_cue(truncate_from):
    template = TEMPLATES["summarize"]
    fitted = fit_prompt(template, LONG_QUERY, [SHOT_A, SHOT_B], count_tokens=count_words, max_tokens=60,
                        truncate_from=truncate_from)
    assert count_words(fitted.text) <= 60
    assert fitted.num_shots == 0 and fitted.words_removed > 0
    assert fitted.text.startswith("Summarize the following conversation.\n\n#Person1#: word0")
    assert fitted.text.endswith("\n\nSummary: ")
    assert "..." in fitted.text
    # 6 words are template text, so 54 dialogue words survive (the marker counts as a word if alone).
    kept = count_words(fitted.text) - count_words("Summarize the following conversation. Summary:")
    assert kept >= 53
    assert ("word39" in fitted.text) == (truncate_from == "middle")


@pytest.mark.parametrize("truncate_from, expected", [("middle", "S: a b ... h\nT: "), ("end", "S: a b c ...\nT: ")])
def test_truncation_exact_strings(truncate_from, expected):
    template = PromptTemplate("short", "S: {dialogue}\nT: ")
    # Budget 6 words: "S:" and "T:" are 2, the "..." marker 1, so 3 of the 8 dialogue words fit.
    fitted = fit_prompt(template, {"dialogue": "a b c d e f g h"}, count_tokens=count_words, max_tokens=6,
                        truncate_from=truncate_from)
    assert fitted.text == expected and fitted.words_removed == 5


def test_truncation_keeps_the_most_words_that_fit():
    fitted = fit_prompt(TEMPLATES["tldr"], LONG_QUERY, count_tokens=len, max_tokens=300, truncate_from="end")
    assert len(fitted.text) <= 300
    pieces = re.findall(r"\S+\s*", LONG_QUERY["dialogue"])
    kept = len(pieces) - fitted.words_removed
    assert fitted.text == "".join(pieces[:kept]) + "...\n\nTL;DR: "
    assert len("".join(pieces[:kept + 1]) + "...\n\nTL;DR: ") > 300


def test_budget_too_small_for_the_template_is_a_clear_error():
    with pytest.raises(InputError, match="needs 6 tokens without any dialogue, more than max_tokens=3"):
        fit_prompt(TEMPLATES["summarize"], QUERY, count_tokens=count_words, max_tokens=3)


def test_bad_inputs_name_the_problem():
    with pytest.raises(DataError, match="lacks field"):
        build_prompt("summarize", {"id": "x", "text": "hi"})
    with pytest.raises(InputError, match="unknown prompt template 'nope'"):
        build_prompt("nope", QUERY)
    with pytest.raises(ValueError, match="no \\{dialogue\\} slot"):
        PromptTemplate("bad", "Summarize: {text}")
    with pytest.raises(ValueError, match="together"):
        fit_prompt(TEMPLATES["summarize"], QUERY, max_tokens=10)


def test_select_shots_is_deterministic_and_excludes_the_query():
    pool = [{"id": f"e{i}", "dialogue": "d", "summary": "s"} for i in range(20)]
    first = select_shots(pool, 3, seed=7, exclude_id="e5")
    assert first == select_shots(pool, 3, seed=7, exclude_id="e5")
    assert len({e["id"] for e in first}) == 3
    assert select_shots(pool, 3, seed=8) != first
    assert all(e["id"] != "e5" for seed in range(50) for e in select_shots(pool, 19, seed=seed, exclude_id="e5"))
    with pytest.raises(InputError, match="cannot select 20 shots from 19"):
        select_shots(pool, 20, seed=0, exclude_id="e0")
