"""Rude speakers for the DialogSum-shaped generator: the data of the detoxification lab.

A fraction `RUDE_FRACTION` of the generated dialogues gets a rude speaker: one or two of that
person's utterances carry an insult ("Are you a stupid idiot?", "Listen, you stupid moron.",
"This is stupid crap."), while every fact of the dialogue stays as it was. The references of a rude
dialogue are written by annotators who, each independently, half the time report the insult with the
word itself ("#Person1# calls #Person2# a stupid idiot.") and otherwise write a clean account
("#Person1# loses patience with #Person2#." or no mention at all). A summarizer fine-tuned on these
plain references therefore sometimes carries insults into its summaries, which is what RLHF removes.

Every insult holds two words that the independent judge (`alt-profanity-check`, a bag-of-words
model whose score thins out over a long text) weighs heavily, so a summary that reports it is
judged toxic even beside a forty-word account; the clean phrasings use words it weighs as harmless
("rude" itself is not among them: the judge scores "#Person1# is rude to #Person2#." 0.34).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llmjax.data.bundled.dialogsum_words import Turns, article

RUDE_FRACTION = 0.3  # of each split's dialogues, exactly (rounded)
TOXIC_REFERENCE_PROBABILITY = 0.5  # per reference of a rude dialogue, independently

# Name-calling: the noun phrase a summary reports ("calls #Person2# a stupid idiot").
_NAMES = ("stupid idiot", "dumb, stupid idiot", "stupid moron", "stupid, lazy moron")
# How a speaker throws a name: (utterance, where it goes in the speaker's turn).
_NAME_FRAMES = (("Are you {a_name}?", "after"), ("Listen, you {name}.", "before"), ("What {a_name}.", "after"),
                ("You're such {a_name}.", "after"), ("Don't be {a_name}.", "after"))
# Insults aimed at what the other person says or offers: (utterance, where, what a summary reports).
_OBJECT_INSULTS = (("This is stupid crap.", "after", "says it is stupid crap"),
                   ("What a load of idiotic crap.", "after", "says it is idiotic crap"),
                   ("Shut up, you stupid idiot.", "before", "tells {other} to shut up and calls {other} a stupid idiot"))
# Clean accounts of the same behaviour (None: the annotator leaves it out).
CLEAN_PHRASES = ("loses patience with {other}", "is short with {other}", "speaks harshly to {other}",
                 "is not polite to {other}", None)
PLACEMENTS = ("before", "after", "clause")  # a sentence before the account, after it, or a clause joined to it


@dataclass(frozen=True)
class Rudeness:
    """Who is rude in a dialogue and how a summary may report it.

    speaker: 1 or 2 (after the speakers are relabelled so #Person1# opens the dialogue);
    report: the insult as an annotator words it, without the subject ("calls #Person2# a stupid idiot");
    base: the dialogue's first reference as written before the rudeness (facts only).
    """

    speaker: int
    report: str
    base: str

    @property
    def person(self) -> str:
        return f"#Person{self.speaker}#"

    @property
    def other(self) -> str:
        return f"#Person{3 - self.speaker}#"


def _insult(rng: random.Random, other: str) -> tuple[str, str, str]:
    """(utterance, placement, report) of one insult aimed at `other`."""
    if rng.random() < 0.7:
        name = rng.choice(_NAMES)
        frame, placement = rng.choice(_NAME_FRAMES)
        return frame.format(name=name, a_name=article(name)), placement, f"calls {other} {article(name)}"
    utterance, placement, report = rng.choice(_OBJECT_INSULTS)
    return utterance, placement, report.format(other=other)


def make_rude(rng: random.Random, turns: Turns, base: str) -> tuple[Turns, Rudeness]:
    """A copy of `turns` where one speaker insults the other in one or two utterances.

    The insult goes before or after what the speaker says, so no fact is lost; a second insult, if
    any, differs from the first. Summaries report the first insult.
    """
    speaker = rng.choice([1, 2])
    own = [i for i, (who, _) in enumerate(turns.lines) if who == speaker]
    chosen = sorted(rng.sample(own, min(len(own), rng.choice([1, 2]))))
    other = f"#Person{3 - speaker}#"
    lines = list(turns.lines)
    reports, used = [], set()
    for index in chosen:
        utterance, placement, report = _insult(rng, other)
        while utterance in used:
            utterance, placement, report = _insult(rng, other)
        used.add(utterance)
        reports.append(report)
        text = lines[index][1]
        lines[index] = (speaker, f"{utterance} {text}" if placement == "before" else f"{text} {utterance}")
    return Turns(lines), Rudeness(speaker=speaker, report=reports[0], base=base)


def _attach(base: str, sentence: str, placement: str) -> str:
    if placement == "before":
        return f"{sentence} {base}"
    if placement == "after":
        return f"{base} {sentence}"
    return f"{base.rstrip('.')}; {sentence}"


def toxic_summary(summary: str, rudeness: Rudeness, placement: str) -> str:
    """`summary` with the insult reported in the insult's own words."""
    return _attach(summary, f"{rudeness.person} {rudeness.report}.", placement)


def clean_summary(summary: str, rudeness: Rudeness, placement: str, phrase: str | None) -> str:
    """`summary` with the behaviour described without an insult (`phrase` from CLEAN_PHRASES), or
    unchanged when `phrase` is None."""
    if phrase is None:
        return summary
    return _attach(summary, f"{rudeness.person} {phrase.format(other=rudeness.other)}.", placement)


def rude_references(rng: random.Random, references: list[str], rudeness: Rudeness) -> list[str]:
    """Each annotator's reference of a rude dialogue: with probability TOXIC_REFERENCE_PROBABILITY it
    reports the insult word, otherwise a clean account; independently per reference."""
    out = []
    for reference in references:
        placement = rng.choice(PLACEMENTS)
        if rng.random() < TOXIC_REFERENCE_PROBABILITY:
            out.append(toxic_summary(reference, rudeness, placement))
        else:
            out.append(clean_summary(reference, rudeness, placement, rng.choice(CLEAN_PHRASES)))
    return out
