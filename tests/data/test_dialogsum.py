"""The DialogSum-shaped generator (deterministic, disjoint splits, DialogSum layout, abstractive) and
the loader for the real release formats (JSONL with fname/summary1..3, JSON list, CSV)."""

import collections
import csv
import json
import re
from pathlib import Path

import pytest

from llmjax.data.bundled.dialogsum import (
    SCENARIOS, bundled_dialogsum, dialogsum_stats, generate_dialogsum, load_dialogsum, write_dialogsum,
)
from llmjax.errors import DataError, InputError, InputNotFoundError

TURN = re.compile(r"#Person[12]#: \S.*")
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def small():
    return generate_dialogsum(600, seed=3)


def test_deterministic_for_a_seed_and_different_across_seeds(small):
    assert generate_dialogsum(600, seed=3) == small
    assert generate_dialogsum(600, seed=4)["train"][0] != small["train"][0]


def test_split_sizes_ids_and_no_dialogue_shared(small):
    assert {split: len(v) for split, v in small.items()} == {"train": 480, "validation": 60, "test": 60}
    ids = [e["id"] for split in small.values() for e in split]
    assert len(set(ids)) == len(ids)
    assert small["validation"][7]["id"] == "validation_7"
    dialogues = [e["dialogue"] for split in small.values() for e in split]
    assert len(set(dialogues)) == len(dialogues)


def test_examples_have_dialogsum_layout(small):
    for example in small["train"]:
        assert set(example) == {"id", "dialogue", "summary", "topic", "rude"}
        turns = example["dialogue"].split("\n")
        assert len(turns) >= 4 and all(TURN.fullmatch(turn) for turn in turns)
        assert {"#Person1#", "#Person2#"} <= set(re.findall(r"#Person\d#", example["dialogue"]))
        assert example["summary"][-1] == "." and example["summary"] not in example["dialogue"]
        assert example["topic"] in SCENARIOS


def test_many_topics_and_varied_turn_counts(small):
    assert len(SCENARIOS) >= 20
    assert {e["topic"] for e in small["train"]} == set(SCENARIOS)
    assert len({e["dialogue"].count("\n") for e in small["train"]}) >= 5


def test_summaries_state_outcomes_inferred_across_turns(small):
    examples = [e for split in small.values() for e in split]
    flights = [e for e in examples if e["topic"] == "book a flight"]
    assert len(flights) > 10
    for example in flights:
        # The traveller's constraint, stated turns before the choice, decides which flight is booked.
        must_arrive_early = "before noon" in example["dialogue"] or "by midday" in example["dialogue"]
        departure = re.search(r"\d+:\d\d (am|pm)", example["summary"]).group(1)
        assert (departure == "am") == must_arrive_early, example
    hotels = [e for e in examples if e["topic"] == "hotel check-in" and "a night" in e["summary"]]
    assert hotels
    for example in hotels:
        # The total is nights (said as a word in the dialogue) x the nightly rate.
        nightly, total = (int(x) for x in re.search(r"at \$(\d+) a night \$(\d+) in total", example["summary"].replace(",", "")).groups())
        nights = ["two", "three", "four", "five", "six"].index(re.search(r"(\w+) nights", example["dialogue"]).group(1)) + 2
        assert total == nights * nightly


def test_test_split_has_three_references_with_the_same_facts(small):
    assert all("summaries" not in e for split in ("train", "validation") for e in small[split])
    for example in small["test"]:
        references = example["summaries"]
        assert len(set(references)) == 3 and references[0] == example["summary"], example
    flights = [e for e in small["test"] if e["topic"] == "book a flight"]
    assert flights
    for example in flights:
        # Three annotators, one departure time and one city.
        times = {re.search(r"\d+:\d\d [ap]m", reference).group(0) for reference in example["summaries"]}
        assert len(times) == 1 and times.pop() in example["summary"]


def test_stats_show_abstractive_summaries(small):
    stats = dialogsum_stats(small)
    assert stats["all"]["examples"] == 600
    assert 40 < stats["all"]["dialogue_words"] < 150 and 10 < stats["all"]["summary_words"] < 40
    assert stats["all"]["vocabulary"] > 800
    assert stats["all"]["summary_bigrams_in_dialogue"] < 0.4


def test_readme_statistics_table_and_scenarios_describe_the_default_set():
    """The README's numbers are recomputed from ``generate_dialogsum(4000, seed=0)`` (the bundled set)."""
    readme = README.read_text()
    splits = {split: bundled_dialogsum(split) for split in ("train", "validation", "test")}
    stats = dialogsum_stats(splits)
    rows = re.findall(r"^\| (train|validation|test|all) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \| ([\d.]+)% \|$",
                      readme, re.MULTILINE)
    assert [row[0] for row in rows] == ["train", "validation", "test", "all"], rows
    for split, *claimed in rows:
        s = stats[split]
        actual = [str(s["examples"]), f"{s['dialogue_words']:.1f}", f"{s['summary_words']:.1f}",
                  str(s["vocabulary"]), f"{100 * s['summary_bigrams_in_dialogue']:.1f}"]
        assert actual == claimed, split

    count, names = re.search(r"(\d+) scenarios \(([^)]*)\)", readme).groups()
    listed = [name.strip() for name in names.replace("\n", " ").split(",")]
    assert int(count) == len(listed) == len(SCENARIOS)
    assert sorted(listed) == sorted(SCENARIOS)
    assert {e["topic"] for e in splits["train"]} == set(SCENARIOS)

    turns = collections.Counter(len(e["dialogue"].splitlines()) for split in splits.values() for e in split)
    low, high, mode = map(int, re.search(r"Turns per dialogue range from (\d+) to (\d+) \(mode (\d+)\)", readme).groups())
    assert (min(turns), max(turns), turns.most_common(1)[0][0]) == (low, high, mode)
    per_topic = collections.Counter(e["topic"] for e in splits["train"])
    fewest, most = map(int, re.search(r"each topic has (\d+) to (\d+) training examples", readme).groups())
    assert (min(per_topic.values()), max(per_topic.values())) == (fewest, most)


def test_bundled_is_cached_and_copied():
    train = bundled_dialogsum("train")
    assert len(train) == 3200 and len(bundled_dialogsum("test")) == 400
    train[0]["summary"] = "changed"
    assert bundled_dialogsum("train")[0]["summary"] != "changed"
    with pytest.raises(InputError, match="unknown split 'dev'; choose one of train, validation, test"):
        bundled_dialogsum("dev")


def test_write_then_load_round_trips(tmp_path, small):
    paths = write_dialogsum(tmp_path, num_examples=600, seed=3)
    assert sorted(p.name for p in paths.values()) == ["test.jsonl", "train.jsonl", "validation.jsonl"]
    assert load_dialogsum(tmp_path, "validation") == small["validation"]
    assert load_dialogsum(tmp_path) == small
    assert load_dialogsum(paths["test"]) == small["test"]


def test_loads_real_github_release_jsonl(tmp_path):
    rows = [{"fname": "test_1", "dialogue": "#Person1#: Hi.\r\n#Person2#: Hey.", "summary1": "One.", "summary2": "Two.",
             "summary3": "Three.", "topic1": "greeting", "topic2": "hello", "topic3": "meet"}]
    (tmp_path / "dialogsum.test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dev = {"fname": "dev_1", "dialogue": "#Person1#: A\n#Person2#: B", "summary": "S.", "topic": "t"}
    (tmp_path / "dialogsum.dev.jsonl").write_text(json.dumps(dev) + "\n")
    assert load_dialogsum(tmp_path, "test") == [{"id": "test_1", "dialogue": "#Person1#: Hi.\n#Person2#: Hey.", "summary": "One.",
                                                 "topic": "greeting", "summaries": ["One.", "Two.", "Three."]}]
    assert load_dialogsum(tmp_path) == {"validation": [{"id": "dev_1", "dialogue": "#Person1#: A\n#Person2#: B", "summary": "S.", "topic": "t"}],
                                        "test": load_dialogsum(tmp_path, "test")}


def test_loads_hub_csv_and_json(tmp_path):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "dialogue", "summary", "topic"])
        writer.writerow(["train_0", "#Person1#: Hi, Tom.\n#Person2#: Hi.", "They meet, say \"hi\".", "greeting"])
    assert load_dialogsum(path) == [{"id": "train_0", "dialogue": "#Person1#: Hi, Tom.\n#Person2#: Hi.",
                                     "summary": 'They meet, say "hi".', "topic": "greeting"}]
    json_path = tmp_path / "validation.json"
    json_path.write_text(json.dumps([{"id": "v0", "dialogue": "d", "summary": "s"}]))
    assert load_dialogsum(tmp_path, "validation") == [{"id": "v0", "dialogue": "d", "summary": "s", "topic": ""}]


def test_missing_field_names_field_file_and_row(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"id": "a", "dialogue": "d", "summary": "s"}) + "\n" + json.dumps({"id": "b", "dialogue": "d"}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl, line 2: missing field 'summary' \(accepted names: summary, summary1\)"):
        load_dialogsum(path)
    csv_path = tmp_path / "test.csv"
    csv_path.write_text("fname,summary\nx,y\n")
    with pytest.raises(DataError, match=r"test\.csv, row 2: missing field 'dialogue'"):
        load_dialogsum(csv_path)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{\"id\": 1}")
    with pytest.raises(DataError, match="expected a JSON list of examples, got dict"):
        load_dialogsum(bad_json)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        load_dialogsum(tmp_path / "nope.jsonl")
    with pytest.raises(InputNotFoundError, match="no test file in .*expected one of: test.jsonl"):
        load_dialogsum(tmp_path, "test")
    with pytest.raises(InputNotFoundError, match="no DialogSum split files"):
        load_dialogsum(tmp_path)
    (tmp_path / "train.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_dialogsum(tmp_path / "train.txt")
