"""The generated corpus: deterministic, grammatical on the surface, true where it states facts."""

import calendar
import json
import re

import pytest

from llmjax.data.bundled import corpus
from llmjax.data.bundled.corpus import TOPICS, corpus_stats, generate_corpus, write_corpus


@pytest.fixture(scope="module")
def documents():
    return generate_corpus(2000, seed=0)


def test_same_seed_same_documents_different_seed_different():
    assert generate_corpus(50, seed=3) == generate_corpus(50, seed=3)
    assert generate_corpus(50, seed=3) != generate_corpus(50, seed=4)
    # A longer run extends a shorter one: documents do not depend on how many are asked for.
    assert generate_corpus(80, seed=3)[:50] == generate_corpus(50, seed=3)


def test_count_and_bad_count():
    assert generate_corpus(0) == []
    assert len(generate_corpus(7)) == 7
    with pytest.raises(ValueError, match="num_documents must be >= 0, got -1"):
        generate_corpus(-1)


def test_surface_grammar(documents):
    for text in documents:
        assert "{" not in text and "}" not in text, text  # every template field was filled
        assert "  " not in text and " ," not in text and " ." not in text, text
        assert text[0].isupper() and text.endswith("."), text
        assert text.isascii(), text
        for sentence in re.split(r"(?<=[.!?]) ", text):
            assert sentence[0].isupper() or sentence[0].isdigit() or sentence[0] == "-", sentence
        # "a"/"an" agree with the sound of the next word.
        for article, word in re.findall(r"\b([Aa]n?) (\w+)", text):
            vowel_sound = word[0].lower() in "aeiou" or word == "hour"
            assert (article.lower() == "an") == vowel_sound, (article, word, text)


def test_every_topic_appears_and_texts_vary(documents):
    openings = {text.split(".")[0].split(",")[0] for text in documents}
    assert len(set(documents)) > 0.99 * len(documents)
    assert len(openings) > 100
    # Each topic has a phrase only it writes.
    markers = {"daily_life": "walked to the", "science": "planet", "story": "nce upon a time|ong ago",
               "weather": "forecast|will be", "travel": "travelled|wanted to visit", "cooking": "recipe for",
               "work": "works as|has been a", "numbers_and_dates": "umbers", "school": "at school|lesson",
               "sport_and_home": "plays|at home and"}
    assert set(markers) == set(TOPICS)
    for topic, pattern in markers.items():
        assert any(re.search(pattern, text) for text in documents), topic


def test_stated_facts_are_true(documents):
    text = " ".join(documents)
    sums = re.findall(r"(\d+) plus (\d+) equals (\d+)", text)
    differences = re.findall(r"(\d+) minus (\d+) equals (\d+)", text)
    products = re.findall(r"(\d+) times (\d+) is (\d+)", text)
    assert sums and differences and products
    assert all(int(a) + int(b) == int(c) for a, b, c in sums)
    assert all(int(a) - int(b) == int(c) for a, b, c in differences)
    assert all(int(a) * int(b) == int(c) for a, b, c in products)
    month_days = re.findall(r"([A-Z][a-z]+) has (\d+) days", text)
    assert month_days
    for month, days in month_days:
        assert calendar.monthrange(2023, list(calendar.month_name).index(month))[1] == int(days)
    planets = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
    ordinals = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
    for planet, ordinal in re.findall(r"(\w+) is the (\w+) planet from the Sun", text):
        assert planets.index(planet) == ordinals.index(ordinal)
    legs = {"spiders": "eight", "ants": "six", "bees": "six", "owls": "two", "dogs": "four", "frogs": "four"}
    for animal, count in re.findall(r"(\w+) have (\w+) legs", text):
        assert legs.get(animal.lower(), count) == count, animal
    for born_month, day, year in re.findall(r"born on ([A-Z][a-z]+) (\d+), (\d+)", text):
        assert int(day) <= calendar.monthrange(2023, list(calendar.month_name).index(born_month))[1]


def test_corpus_stats_counts_by_hand():
    stats = corpus_stats(["The cat's hat.", "the  CAT -8 degrees!"])
    # unique: the, cat's, hat, cat, -8, degrees
    assert stats == {"documents": 2, "words": 7, "unique_words": 6}


def test_docstring_numbers_are_measured():
    stats = corpus_stats(generate_corpus(10_000, seed=0))
    doc = corpus.__doc__.replace(",", "")
    assert f"{stats['documents']} documents" in doc
    assert f"{stats['words']} words" in doc
    assert f"{stats['unique_words']} unique words" in doc


def test_write_corpus_jsonl(tmp_path):
    path = write_corpus(tmp_path / "sub" / "corpus.jsonl", 30, seed=1)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"text": text} for text in generate_corpus(30, seed=1)]
