"""The detox lab's data: rude speakers in the DialogSum-shaped set (exact fraction, facts and clean
dialogues unchanged), toxicity labels (balanced, deterministic, disjoint from every dialogue and
summary), preference pairs, held-out prompts, the JSONL loaders' errors and `llmjax data detox`."""

import json

import pytest

from llmjax import cli
from llmjax.data.bundled import dialogsum
from llmjax.data.bundled.detox import LABELS, load_labels, load_pairs, preference_pairs, rude_prompts, toxicity_labels
from llmjax.data.bundled.dialogsum import SPLITS, bundled_dialogsum, generate_dialogsum, rude_dialogues
from llmjax.data.bundled.dialogsum_rude import RUDE_FRACTION
from llmjax.errors import DataError, InputError, InputNotFoundError


@pytest.fixture(scope="module")
def small():
    return generate_dialogsum(600, seed=3)


@pytest.fixture(scope="module")
def without_rudeness():
    """The same set generated with no rude speaker: what the set was before rudeness existed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dialogsum, "RUDE_FRACTION", 0.0)
        dialogsum._generate.cache_clear()
        clean = generate_dialogsum(600, seed=3)
    dialogsum._generate.cache_clear()
    return clean


def test_exact_rude_fraction_per_split_and_flags(small):
    assert 0.25 <= RUDE_FRACTION <= 0.35
    for split, examples in small.items():
        assert sum(e["rude"] for e in examples) == round(RUDE_FRACTION * len(examples)), split
        assert all(isinstance(e["rude"], bool) for e in examples)
    assert [e["id"] for e, _ in rude_dialogues("test", 600, 3)] == [e["id"] for e in small["test"] if e["rude"]]


def test_rudeness_leaves_clean_dialogues_splits_and_facts_unchanged(small, without_rudeness):
    for split in SPLITS:
        for rude, clean in zip(small[split], without_rudeness[split], strict=True):
            assert rude["id"] == clean["id"] and rude["topic"] == clean["topic"]
            if not rude["rude"]:
                assert rude == clean
                continue
            # Every turn keeps its words; one speaker's one or two turns gain an insult before or after them.
            rude_turns, clean_turns = rude["dialogue"].split("\n"), clean["dialogue"].split("\n")
            assert len(rude_turns) == len(clean_turns)
            changed = [(r, c) for r, c in zip(rude_turns, clean_turns) if r != c]
            assert 1 <= len(changed) <= 2 and len({r[:10] for r, _ in changed}) == 1, rude["dialogue"]
            for r, c in changed:
                assert _inserted_words(c.split(" "), r.split(" ")), (r, c)
            # Every reference states the clean reference's facts in the same words, plus or minus the insult.
            for reference, clean_reference in zip(rude.get("summaries", [rude["summary"]]),
                                                  clean.get("summaries", [clean["summary"]])):
                assert clean_reference.rstrip(".") in reference


def _inserted_words(clean: list[str], rude: list[str]) -> bool:
    """Whether `rude` is `clean` with whole words inserted (an insult utterance of 2 to 12 words each)."""
    remaining = iter(rude)
    return all(word in remaining for word in clean) and 2 <= len(rude) - len(clean) <= 24


def test_about_half_of_the_rude_references_report_the_insult():
    rude = rude_dialogues("test")
    references = [(reference, rudeness) for example, rudeness in rude for reference in example["summaries"]]
    toxic = [rudeness.report in reference for reference, rudeness in references]
    assert len(references) == 3 * 120 and 0.4 < sum(toxic) / len(toxic) < 0.6
    firsts = [rudeness.report in example["summary"] for example, rudeness in rude_dialogues("train")]
    assert 0.4 < sum(firsts) / len(firsts) < 0.6  # the training references the summarizer learns from
    assert all(len(set(example["summaries"])) == 3 for example, _ in rude)


def test_rude_prompts_are_the_rude_examples_of_a_split():
    prompts = rude_prompts("test")
    assert len(prompts) == 120 and all(e["rude"] for e in prompts)
    assert prompts == [e for e in bundled_dialogsum("test") if e["rude"]]
    assert rude_prompts("validation", 600, 3) == [e for e in generate_dialogsum(600, 3)["validation"] if e["rude"]]


def test_labels_are_deterministic_balanced_and_distinct():
    splits = {split: toxicity_labels(split) for split in SPLITS}
    assert {split: len(v) for split, v in splits.items()} == {"train": 1600, "validation": 200, "test": 200}
    for split, examples in splits.items():
        assert abs(sum(e["label"] for e in examples) - len(examples) / 2) <= 1, split
        assert {e["label"] for e in examples} == {0, 1} and set(examples[0]) == {"id", "text", "label"}
        assert examples[3]["id"] == f"{split}_3"
    texts = [e["text"] for v in splits.values() for e in v]
    assert len(set(texts)) == len(texts) and len({t.split(" ")[0] for t in texts}) > 20
    assert toxicity_labels("test") == splits["test"]
    assert toxicity_labels("test", seed=1) != splits["test"]
    assert LABELS == ("non_toxic", "toxic")
    with pytest.raises(InputError, match="unknown split 'dev'"):
        toxicity_labels("dev")


def test_label_texts_share_no_text_with_any_dialogue_or_summary():
    texts = [e["text"] for split in SPLITS for e in toxicity_labels(split)]
    dialogsum_texts = [text for split in SPLITS for e in bundled_dialogsum(split)
                       for text in (e["dialogue"], *e.get("summaries", [e["summary"]]))]
    dialogsum_texts += [text for split in SPLITS for pair in preference_pairs(split) for text in (pair["chosen"], pair["rejected"])]
    # One search per string over the other side joined by a separator no text holds.
    joined_dialogsum, joined_labels = "\0".join(dialogsum_texts), "\0".join(texts)
    assert not [t for t in texts if t in joined_dialogsum]
    assert not [t for t in dialogsum_texts if t in joined_labels]


def test_preference_pairs_are_rude_dialogues_with_a_clean_and_an_insulting_summary():
    pairs = preference_pairs("validation")
    rude = rude_dialogues("validation")
    assert len(pairs) == len(rude) == 120
    for pair, (example, rudeness) in zip(pairs, rude):
        assert set(pair) == {"id", "prompt", "chosen", "rejected"}
        assert pair["id"] == example["id"] and pair["prompt"] == example["dialogue"]
        assert rudeness.report in pair["rejected"] and rudeness.report not in pair["chosen"]
        base = rudeness.base.rstrip(".")
        assert base in pair["chosen"] and base in pair["rejected"]
    assert preference_pairs("validation") == pairs and len(preference_pairs("test", 600, 3)) == 18


def _write(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_load_labels_accepts_indices_and_names(tmp_path):
    path = _write(tmp_path / "labels.jsonl", [{"text": "You idiot.", "label": "toxic"}, "",
                                              {"id": "b", "text": "Thanks!", "label": 0}, {"text": "Crap.", "label": 1}])
    assert load_labels(path) == [{"id": "line_1", "text": "You idiot.", "label": 1}, {"id": "b", "text": "Thanks!", "label": 0},
                                 {"id": "line_4", "text": "Crap.", "label": 1}]


@pytest.mark.parametrize("row, message", [
    ({"text": "x"}, r"labels\.jsonl, line 2: missing field 'label'; every line needs text, label"),
    ({"text": "x", "label": "rude"}, r"line 2: label 'rude' is not one of 0, 1, 'non_toxic', 'toxic'; use 1 or 'toxic'"),
    ({"text": "x", "label": 2}, r"line 2: label 2 is not one of"),
    ({"text": "x", "label": True}, r"line 2: label True is not one of"),
    ({"text": 3, "label": 0}, r"line 2: field 'text' must be a string, got int"),
    ("[1, 2]", r"line 2: expected an object with text, label; got list"),
    ("{text: 1}", r"line 2: not valid JSON"),
])
def test_load_labels_errors_name_file_line_and_fix(tmp_path, row, message):
    path = _write(tmp_path / "labels.jsonl", [{"text": "fine", "label": 0}, row])
    with pytest.raises(DataError, match=message):
        load_labels(path)


def test_load_pairs_and_file_errors(tmp_path):
    row = {"prompt": "#Person1#: Hi.", "chosen": "They greet.", "rejected": "They greet, idiot."}
    assert load_pairs(_write(tmp_path / "pairs.jsonl", [row])) == [{"id": "line_1", **row}]
    with pytest.raises(DataError, match=r"pairs\.jsonl, line 1: missing field 'rejected'; every line needs prompt, chosen, rejected"):
        load_pairs(_write(tmp_path / "pairs.jsonl", [{**row, "rejected": ""}]))
    with pytest.raises(DataError, match=r"empty\.jsonl holds no examples; write one JSON object with prompt, chosen, rejected per line"):
        load_pairs(_write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(InputNotFoundError, match=r"nope\.jsonl does not exist; pass a JSONL file with one \{text, label\} object"):
        load_labels(tmp_path / "nope.jsonl")


def test_cli_writes_labels_and_pairs_that_load_back(tmp_path, capsys):
    out = tmp_path / "detox"
    assert cli.main(["data", "detox", "--out", str(out), "--num-labels", "60", "--num-examples", "100"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{kind}_{split}.jsonl" for kind in ("labels", "pairs") for split in SPLITS)
    labels = load_labels(out / "labels_train.jsonl")
    assert [{**e, "id": e["id"]} for e in labels] == toxicity_labels("train", 60)
    assert load_pairs(out / "pairs_test.jsonl") == preference_pairs("test", 100)
    assert "wrote toxicity labels and preference pairs (6 files)" in capsys.readouterr().out
    # A non-empty --out is refused (one line, exit 2) and left as it was.
    assert cli.main(["data", "detox", "--out", str(out)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert len(list(out.iterdir())) == 6


def test_cli_failure_leaves_nothing_behind(tmp_path, capsys):
    assert cli.main(["data", "detox", "--out", str(tmp_path / "detox"), "--num-labels", "3"]) == 2
    assert "num_examples must be at least 6" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_loader_keeps_the_rude_flag(tmp_path, small):
    dialogsum.write_dialogsum(tmp_path, num_examples=600, seed=3)
    assert dialogsum.load_dialogsum(tmp_path, "test") == small["test"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "a", "dialogue": "d", "summary": "s", "rude": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 1: field 'rude' must be true or false, got 'maybe'"):
        dialogsum.load_dialogsum(tmp_path / "bad.jsonl")
