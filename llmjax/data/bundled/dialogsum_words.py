"""Word tables and the small drawing/rendering helpers the DialogSum-shaped generator is built from.

The scenarios in `dialogsum_scenarios.py` draw names, places, times and amounts from here, and
say them one way in the dialogue ("half past seven in the evening", "forty dollars") and another
way in the summary ("7:30 pm", "$40"), so a summary has to be rewritten, not copied.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

NAMES = [
    "Tom", "Mary", "Jack", "Linda", "David", "Susan", "Peter", "Jenny", "Mike", "Lucy", "Steven", "Anna",
    "Bill", "Kate", "Frank", "Emma", "George", "Helen", "Sam", "Rachel", "Daniel", "Grace", "Paul", "Julia",
    "Mark", "Nancy", "Chris", "Sophie", "Kevin", "Laura", "Brian", "Monica", "Eric", "Alice", "Henry", "Diana",
]
CITIES = [
    "Chicago", "Boston", "London", "Paris", "Tokyo", "Beijing", "Sydney", "Toronto", "Berlin", "Rome",
    "Madrid", "Seattle", "Denver", "Miami", "Dublin", "Vienna", "Lisbon", "Shanghai", "Vancouver", "Atlanta",
]
COMPANIES = [
    "Sunrise Trading", "Blue Ocean Logistics", "Greenfield Bank", "Apex Software", "Northstar Media",
    "Golden Gate Foods", "Pacific Motors", "Maple Consulting", "Silverline Hotels", "Harbor Insurance",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
COLORS = ["red", "blue", "black", "white", "green", "grey", "brown", "yellow", "navy", "pink"]

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """English words for 0 <= n < 10000 ("forty-five", "one hundred and twenty")."""
    if not 0 <= n < 10000:
        raise ValueError(f"number_words handles 0..9999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        head = _ONES[n // 100] + " hundred"
        return head if n % 100 == 0 else f"{head} and {number_words(n % 100)}"
    head = number_words(n // 1000) + " thousand"
    if n % 1000 == 0:
        return head
    joiner = " and " if n % 1000 < 100 else " "
    return head + joiner + number_words(n % 1000)


def dollars(amount: float) -> str:
    """Summary-style money: "$45", "$12.50"."""
    return f"${amount:,.0f}" if float(amount).is_integer() else f"${amount:,.2f}"


def counted(n: int, noun: str) -> str:
    """"one day", "three days": the count in words and the noun in the right number (regular plurals)."""
    return f"{number_words(n)} {noun}{'' if n == 1 else 's'}"


def article(word: str) -> str:
    """"a sweater" / "an umbrella"."""
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


@dataclass(frozen=True)
class ClockTime:
    """A time of day; spoken several ways in dialogues, written one way ("7:30 pm") in summaries."""

    hour: int  # 1..12
    minute: int  # 0, 15, 30 or 45
    pm: bool

    def written(self) -> str:
        return f"{self.hour}:{self.minute:02d} {'pm' if self.pm else 'am'}"

    def spoken(self, rng: random.Random) -> str:
        hour = number_words(self.hour)
        part = "in the evening" if self.pm and self.hour >= 6 and self.hour != 12 else (
            "in the afternoon" if self.pm else "in the morning")
        if self.minute == 0:
            options = [f"{hour} o'clock", f"{hour} {part}", f"{self.hour} {'p.m.' if self.pm else 'a.m.'}"]
        elif self.minute == 30:
            options = [f"half past {hour}", f"{hour} thirty", f"half past {hour} {part}"]
        elif self.minute == 15:
            options = [f"quarter past {hour}", f"{hour} fifteen"]
        else:
            options = [f"quarter to {number_words(self.hour % 12 + 1)}", f"{hour} forty-five"]
        return rng.choice(options)


class Draw:
    """A seeded source of choices for one dialogue; all randomness of the generator goes through it."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.references: list[str] = []  # the last summary's references, as different annotators wrote them

    def pick(self, options):
        return self.rng.choice(options)

    def summarize(self, options, *more_references: str) -> str:
        """The summary, picked from ``options`` exactly as ``pick`` would (so the training data does not
        change); the other options and ``more_references`` become further annotators' references, kept in
        ``self.references`` after the chosen one."""
        chosen = self.rng.choice(options)
        self.references = [chosen, *(option for option in options if option != chosen), *more_references]
        return chosen

    def sample(self, options, k: int):
        return self.rng.sample(options, k)

    def num(self, low: int, high: int, step: int = 1) -> int:
        """Uniform integer in [low, high] on the grid low, low+step, ..."""
        return self.rng.randrange(low, high + 1, step)

    def chance(self, probability: float) -> bool:
        return self.rng.random() < probability

    def name(self, *exclude: str) -> str:
        return self.pick([n for n in NAMES if n not in exclude])

    def time(self, earliest: int = 8, latest: int = 20) -> ClockTime:
        """A time between `earliest` and `latest` o'clock (24h bounds)."""
        hour24 = self.num(earliest, latest)
        minute = self.pick([0, 0, 15, 30, 30, 45])
        return ClockTime(hour=(hour24 - 1) % 12 + 1, minute=minute, pm=hour24 >= 12)

    def say_time(self, t: ClockTime) -> str:
        return t.spoken(self.rng)

    def say_money(self, amount: int) -> str:
        """Dialogue-style money for whole dollars: "$45", "45 dollars" or "forty-five dollars"."""
        return self.pick([f"${amount}", f"{amount} dollars", f"{number_words(amount)} dollars"])

    def say_count(self, n: int) -> str:
        return self.pick([str(n), number_words(n)]) if n > 10 else number_words(n)


@dataclass
class Turns:
    """The utterances of one dialogue in order, each tagged with its speaker (1 or 2)."""

    lines: list[tuple[int, str]] = field(default_factory=list)

    def p1(self, text: str) -> None:
        self.lines.append((1, text))

    def p2(self, text: str) -> None:
        self.lines.append((2, text))

    def render(self) -> str:
        """DialogSum layout: one turn per line, "#Person1#: text", speakers alternating (consecutive
        utterances of one speaker become one turn)."""
        merged: list[tuple[int, str]] = []
        for speaker, text in self.lines:
            if merged and merged[-1][0] == speaker:
                merged[-1] = (speaker, merged[-1][1] + " " + text)
            else:
                merged.append((speaker, text))
        return "\n".join(f"#Person{speaker}#: {text}" for speaker, text in merged)


_CLOSINGS = [("Thanks a lot.", "You're welcome."), ("Great, see you then.", "See you."), ("Thank you.", "My pleasure."),
             ("Thanks for your help.", "No problem at all."), ("OK, bye for now.", "Bye!")]


def maybe_close(d: Draw, turns: Turns, probability: float = 0.4) -> Turns:
    """Sometimes end with a polite exchange that carries no content, as real dialogues do."""
    if turns.lines and d.chance(probability):
        first, second = d.pick(_CLOSINGS)
        last_speaker = turns.lines[-1][0]
        turns.lines += [(3 - last_speaker, first), (last_speaker, second)]
    return turns


def person1_speaks_first(turns: Turns, summaries: list[str]) -> tuple[Turns, list[str]]:
    """Relabel the speakers so #Person1# opens the dialogue, as in DialogSum, in the summaries too."""
    if not turns.lines or turns.lines[0][0] == 1:
        return turns, summaries
    swapped = Turns([(3 - speaker, text) for speaker, text in turns.lines])
    return swapped, [s.replace("#Person1#", "\0").replace("#Person2#", "#Person1#").replace("\0", "#Person2#")
                     for s in summaries]


Scenario = Callable[[Draw], "tuple[Turns, str]"]


def scenario_registry() -> tuple[dict[str, Scenario], Callable[[str], Callable[[Scenario], Scenario]]]:
    """A fresh `{topic: scenario}` table and the `@scenario(topic)` decorator that fills it."""
    table: dict[str, Scenario] = {}

    def scenario(topic: str) -> Callable[[Scenario], Scenario]:
        def register(fn: Scenario) -> Scenario:
            if topic in table:
                raise ValueError(f"scenario topic {topic!r} is registered twice")
            table[topic] = fn
            return fn
        return register

    return table, scenario
