"""Zero-, one- and few-shot prompts for dialogue summarization, FLAN style, with truncation to a token budget.

A prompt is the shots, each rendered by the template and followed by its answer and a separator,
then the query rendered by the template without its answer:

    Summarize the following conversation.      <- instruction (template text)
                                                
    #Person1#: ...                              <- {dialogue}
                                                
    Summary: {answer of shot 1}                 <- cue, then the shot's `summary`
                                                
                                                <- shot_separator
    Summarize the following conversation.
    ...
    Summary:                                    <- the query ends on the cue; the model writes on

When a prompt is too long, `fit_prompt` drops whole shots first (last in the list first, so pass them
in order of preference), then shortens the query's `truncate_field` by whole words from its middle or
its end. The template text (the instruction and the cue) is never cut.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmjax.errors import DataError, InputError

TRUNCATION_MARKER = "..."


@dataclass(frozen=True)
class PromptTemplate:
    """How one example becomes prompt text.

    template: text with `{field}` slots filled from the example, ending with the answer cue.
    target_field: the example field holding the answer written after a shot.
    references_field: the example field holding every reference answer when there are several (the
      real DialogSum test set's three annotators); its first item equals `target_field`'s value.
    shot_separator: text after each shot's answer, before the next example.
    truncate_field: the query field shortened when the prompt is over budget.
    """

    name: str
    template: str
    target_field: str = "summary"
    references_field: str = "summaries"
    shot_separator: str = "\n\n\n"
    truncate_field: str = "dialogue"

    @property
    def fields(self) -> list[str]:
        """The `{field}` names the template fills, in order of appearance."""
        return [name for _, name, _, _ in string.Formatter().parse(self.template) if name]

    def __post_init__(self):
        if self.truncate_field not in self.fields:
            raise ValueError(f"template {self.name!r} has no {{{self.truncate_field}}} slot to truncate; "
                             f"its slots are {self.fields}")
        if self.target_field in self.fields:
            raise ValueError(f"template {self.name!r} shows its own answer field {{{self.target_field}}}; "
                             "the answer is appended after shots only")


TEMPLATES: dict[str, PromptTemplate] = {
    template.name: template
    for template in (
        PromptTemplate("summarize", "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "),
        PromptTemplate("what_happened", "Dialogue:\n\n{dialogue}\n\nWhat was going on?\n"),
        PromptTemplate("brief", "Read the dialogue below and say in one or two sentences what happened.\n\n{dialogue}\n\nIn short: "),
        PromptTemplate("recap", "Here is a conversation between two people:\n{dialogue}\n\nWrite a short recap of it.\n"),
        PromptTemplate("tldr", "{dialogue}\n\nTL;DR: "),
    )
}


def render_example(template: PromptTemplate, example: dict, with_answer: bool) -> str:
    """The template filled from `example`; with `with_answer`, the answer and the separator follow."""
    needed = template.fields + ([template.target_field] if with_answer else [])
    missing = [name for name in needed if name not in example]
    if missing:
        raise DataError(f"example {example.get('id', '?')!r} lacks field(s) {missing} that template "
                       f"{template.name!r} needs (it has {sorted(example)})")
    text = template.template.format(**{name: example[name] for name in template.fields})
    if with_answer:
        text += str(example[template.target_field]) + template.shot_separator
    return text


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt built within a budget: its text, how many shots survived, how many query words were cut."""

    text: str
    num_shots: int
    words_removed: int


def fit_prompt(template: PromptTemplate, query: dict, shots: Sequence[dict] = (), *,
               count_tokens: Callable[[str], int] | None = None, max_tokens: int | None = None,
               truncate_from: str = "middle") -> FittedPrompt:
    """Build the prompt for `query` after `shots`; with a budget, drop shots then shorten the query.

    count_tokens: text -> number of tokens (e.g. `lambda s: len(tokenizer.encode(s))`).
    truncate_from: "middle" keeps the start and end of the query field (a dialogue's opening and
    outcome), "end" keeps its start. The removed words are replaced by "...".
    """
    if (count_tokens is None) != (max_tokens is None):
        raise ValueError("pass count_tokens and max_tokens together (or neither, for no budget)")
    if truncate_from not in ("middle", "end"):
        raise ValueError(f"truncate_from must be 'middle' or 'end', got {truncate_from!r}")
    rendered_shots = [render_example(template, shot, with_answer=True) for shot in shots]
    query_text = render_example(template, query, with_answer=False)
    if max_tokens is None:
        return FittedPrompt("".join(rendered_shots) + query_text, len(shots), 0)

    for kept in range(len(rendered_shots), -1, -1):
        text = "".join(rendered_shots[:kept]) + query_text
        if count_tokens(text) <= max_tokens:
            return FittedPrompt(text, kept, 0)

    # No shot fits beside the full query: keep as many query words as the budget allows.
    pieces = re.findall(r"\S+\s*", str(query[template.truncate_field]))

    def shortened(keep: int) -> str:
        if truncate_from == "end":
            value = "".join(pieces[:keep]) + TRUNCATION_MARKER
        else:
            head = (keep + 1) // 2
            value = "".join(pieces[:head]) + TRUNCATION_MARKER + " " + "".join(pieces[len(pieces) - (keep - head):])
        return render_example(template, {**query, template.truncate_field: value.rstrip()}, with_answer=False)

    if count_tokens(shortened(0)) > max_tokens:
        raise InputError(f"template {template.name!r} needs {count_tokens(shortened(0))} tokens without any "
                         f"{template.truncate_field}, more than max_tokens={max_tokens}; raise max_tokens or use a shorter template")
    low, high = 0, len(pieces) - 1  # the largest keep that fits lies in [low, high]; all pieces do not fit
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(shortened(middle)) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return FittedPrompt(shortened(low), 0, len(pieces) - low)


def build_prompt(template: PromptTemplate | str, query: dict, shots: Sequence[dict] = (), **budget) -> str:
    """The prompt text for `query` after `shots` (0 = zero-shot, 1 = one-shot, more = few-shot).

    `template` is a PromptTemplate or a name in TEMPLATES; `budget` is fit_prompt's
    count_tokens / max_tokens / truncate_from.
    """
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise InputError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")
        template = TEMPLATES[template]
    return fit_prompt(template, query, shots, **budget).text


def select_shots(examples: Sequence[dict], k: int, seed: int, exclude_id: str | None = None) -> list[dict]:
    """`k` distinct examples drawn with `seed` (the same seed gives the same shots), never the one
    whose id is `exclude_id` (the query, so its own answer never appears in its prompt)."""
    pool = [example for example in examples if exclude_id is None or example.get("id") != exclude_id]
    if not 0 <= k <= len(pool):
        raise InputError(f"cannot select {k} shots from {len(pool)} candidate examples; choose 0 <= k <= {len(pool)}")
    return random.Random(seed).sample(pool, k)
