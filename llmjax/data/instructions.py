"""Instruction data, FLAN style: templates with several wordings per task, formats, and response-only loss.

A *wording* is one ``(prompt, response)`` pair of ``str.format`` templates; a *template set* is the
wordings of one task (FLAN phrases every task several ways so the model follows the instruction, not
one fixed string). Each example gets one wording, drawn from the ``np.random.Generator`` the data
iterator seeds from ``(seed, epoch, example index)``: deterministic for a seed, different across epochs.

A *format* turns one raw example into *pieces*, ``[(text, trained), ...]`` in reading order:

* ``template`` (any registered set or a wordings file): ``[(prompt, False), (response, True)]``.
* ``alpaca``: ``{instruction, input, output}``; the wording has an input section only when ``input``
  is non-empty.
* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``; role headers and
  system/user turns are untrained, every assistant turn is trained (several assistant turns need a
  causal model; one exchange also makes a seq2seq example).

``encode_pieces`` then builds model features (``llmjax.batch`` names, 1-D int32) in a batch format:
``"seq2seq"`` (T5): the encoder reads the prompt, the decoder predicts the response (every target
weighted); ``"causal"`` (decoder-only): the model reads ``[bos] + pieces`` and is weighted only on the
trained pieces and the eos that closes each of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import Any

import numpy as np
import yaml

from llmjax.data.objectives import decoder_turns_example, render_template, seq2seq_instruction_example
from llmjax.errors import UserError


class InstructionDataError(UserError, ValueError):
    """Instruction data that cannot work (unknown template set, missing field, malformed chat)."""


@dataclass(frozen=True)
class Wording:
    """One phrasing of a task: a prompt template and a response template (``{field}`` slots)."""

    prompt: str
    response: str

    @property
    def fields(self) -> set[str]:
        return {name for text in (self.prompt, self.response) for _, name, _, _ in Formatter().parse(text) if name}


Pieces = list[tuple[str, bool]]


# ------------------------------------------------------------------------------------------------ template sets

# Dialogue summarization: the course's two wordings ("Summarize the following conversation." and Lab 1's
# "What was going on?", the same text as ``llmjax.prompts`` evaluates with; a test keeps them equal)
# and five more, so the model learns the task rather than one phrasing.
TEMPLATE_SETS: dict[str, tuple[Wording, ...]] = {
    "dialogsum": tuple(Wording(prompt, "{summary}") for prompt in (
        "Summarize the following conversation.\n\n{dialogue}\n\nSummary: ",
        "Dialogue:\n\n{dialogue}\n\nWhat was going on?\n",
        "Read this conversation and write a one-sentence summary of it.\n\n{dialogue}\n",
        "{dialogue}\n\nWhat happened in the dialogue above? Answer briefly.\n",
        "Here is a conversation:\n{dialogue}\n\nSum it up in a sentence or two.\n",
        "Conversation:\n{dialogue}\n\nWhat did the speakers talk about and decide?\n",
        "Write a short summary of this dialogue.\n\n{dialogue}\n\nSummary: ",
    )),
    "dialogsum_topic": (
        Wording("What is the topic of this conversation?\n\n{dialogue}\n\nTopic: ", "{topic}"),
        Wording("{dialogue}\n\nWhich everyday situation is this dialogue about?\n", "{topic}"),
        Wording("Dialogue:\n{dialogue}\n\nGive the dialogue a short topic label.\n", "{topic}"),
    ),
    # seqio / t5 tasks emit "inputs" and "targets" already phrased by their preprocessors.
    "inputs_targets": (Wording("{inputs}", "{targets}"),),
    "alpaca": (
        Wording("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n", "{output}"),
        Wording("Task: {instruction}\nInput: {input}\nAnswer: ", "{output}"),
    ),
    "alpaca_no_input": (
        Wording("### Instruction:\n{instruction}\n\n### Response:\n", "{output}"),
        Wording("Task: {instruction}\nAnswer: ", "{output}"),
    ),
}


def register_templates(name: str, wordings: Sequence[Wording | tuple[str, str]]) -> None:
    """Add a template set under ``name`` (a task can then name it); a name is registered once."""
    if name in TEMPLATE_SETS or name in FORMATS:
        raise InstructionDataError(f"template set {name!r} already exists; pick another name")
    TEMPLATE_SETS[name] = _as_wordings(wordings, f"template set {name!r}")


def load_templates(path: str | Path) -> tuple[Wording, ...]:
    """Wordings from a YAML/JSON file: a list of ``{prompt: ..., response: ...}`` mappings."""
    path = Path(path)
    if not path.is_file():
        raise InstructionDataError(f"template file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise InstructionDataError(f"template file {path} does not parse: {error}") from None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise InstructionDataError(f"template file {path}: expected a list of {{prompt, response}} mappings")
    for index, item in enumerate(data):
        if set(item) != {"prompt", "response"}:
            raise InstructionDataError(f"template file {path}, item {index}: expected keys prompt and response, "
                                       f"got {sorted(item)}")
    return _as_wordings([(item["prompt"], item["response"]) for item in data], f"template file {path}")


def _as_wordings(wordings, where: str) -> tuple[Wording, ...]:
    result = tuple(w if isinstance(w, Wording) else Wording(*w) for w in wordings)
    if not result:
        raise InstructionDataError(f"{where} has no wordings")
    for wording in result:
        if not all(isinstance(text, str) for text in (wording.prompt, wording.response)):
            raise InstructionDataError(f"{where}: prompt and response templates must be strings, got {wording}")
        if not any(name for _, name, _, _ in Formatter().parse(wording.response)):
            raise InstructionDataError(f"{where}: response {wording.response!r} names no example field")
    return result


def choose_wording(wordings: Sequence[Wording], rng: np.random.Generator) -> Wording:
    """One wording, uniformly, from the example's generator (the same generator state, the same wording)."""
    return wordings[int(rng.integers(len(wordings)))]


# ------------------------------------------------------------------------------------------------ formats


def template_pieces(example: Mapping[str, Any], wording: Wording) -> Pieces:
    """``[(prompt, False), (response, True)]`` rendered from the example's fields."""
    return [(render_template(wording.prompt, example), False), (render_template(wording.response, example), True)]


CHAT_ROLES = ("system", "user", "assistant")
CHAT_HEADERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
CHAT_TURN_SEPARATOR = "\n"


def chat_pieces(messages: Any, where: str = "chat example") -> Pieces:
    """Role-headed turns; only assistant contents are trained (their headers are prompt).

    ``messages``: ``[{"role", "content"}, ...]``, a system turn only first, at least one assistant turn.
    Turns after the last assistant turn carry nothing to learn and are dropped.
    """
    if not isinstance(messages, list) or not messages:
        raise InstructionDataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} turns")
    pieces: Pieces = []
    context = ""  # untrained text waiting to precede the next assistant turn
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) < {"role", "content"}:
            raise InstructionDataError(f"{where}, turn {index}: expected a mapping with role and content, got {message!r}")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise InstructionDataError(f"{where}, turn {index}: role {role!r} is not one of {list(CHAT_ROLES)}")
        if role == "system" and index:
            raise InstructionDataError(f"{where}, turn {index}: a system turn may only come first")
        if not isinstance(content, str):
            raise InstructionDataError(f"{where}, turn {index}: content must be a string, got {type(content).__name__}")
        if role == "assistant":
            pieces += [(context + CHAT_HEADERS[role], False), (content, True)]
            context = CHAT_TURN_SEPARATOR
        else:
            context += CHAT_HEADERS[role] + content + CHAT_TURN_SEPARATOR
    if not pieces:
        raise InstructionDataError(f"{where} has no assistant turn to learn from")
    return pieces


PieceFormatter = Callable[[Mapping[str, Any], np.random.Generator], Pieces]


def make_formatter(templates: str, where: str = "task") -> tuple[PieceFormatter, set[str]]:
    """``(formatter, fields every example needs)`` for a template-set name, ``alpaca``, ``chat`` or a file.

    A formatter maps ``(raw example, rng)`` to pieces; ``rng`` picks the wording.
    """
    if templates == "chat":
        return (lambda example, rng: chat_pieces(example["messages"], where)), {"messages"}
    if templates == "alpaca":
        with_input, without_input = TEMPLATE_SETS["alpaca"], TEMPLATE_SETS["alpaca_no_input"]

        def alpaca(example, rng):
            has_input = str(example.get("input") or "").strip()
            return template_pieces(example, choose_wording(with_input if has_input else without_input, rng))

        return alpaca, {"instruction", "output"}
    if Path(templates).suffix in (".yaml", ".yml", ".json"):
        wordings = load_templates(templates)
    elif templates in TEMPLATE_SETS:
        wordings = TEMPLATE_SETS[templates]
    else:
        raise InstructionDataError(f"{where}: unknown template set {templates!r}; use one of "
                                   f"{sorted(set(TEMPLATE_SETS) | set(FORMATS))} or a .yaml/.json wordings file")
    fields = set.union(*(wording.fields for wording in wordings))
    return (lambda example, rng: template_pieces(example, choose_wording(wordings, rng))), fields


FORMATS = ("alpaca", "chat")  # formats beyond plain template sets


# ------------------------------------------------------------------------------------------------ features


def encode_pieces(
    pieces: Pieces,
    encode: Callable[[str], Sequence[int]],
    *,
    batch_format: str,
    eos_id: int,
    bos_id: int | None = None,
    decoder_start_id: int = 0,
) -> dict[str, np.ndarray]:
    """Model features (1-D int32, ``llmjax.batch`` names) with loss weights on trained pieces only.

    ``encode``: text -> token ids without eos. Pieces are encoded one by one, so a piece boundary is a
    token boundary and the loss mask is exact.

    * ``"seq2seq"``: exactly one trained piece, last: the untrained text before it (+ eos) is the
      encoder input, the trained piece (+ eos) the decoder target.
    * ``"causal"``: ``[bos] + pieces``, trained pieces each closed by a trained eos.
    """
    ids = [(encode(text), trained) for text, trained in pieces]
    if batch_format == "seq2seq":
        if [trained for _, trained in pieces].count(True) != 1 or not pieces[-1][1]:
            raise InstructionDataError("a seq2seq (T5) example needs one response after its prompt; chat with "
                                       "several assistant turns is for decoder-only models")
        prompt = [token for piece, _ in ids[:-1] for token in piece]
        return seq2seq_instruction_example(prompt, ids[-1][0], eos_id, decoder_start_id)
    if batch_format == "causal":
        return decoder_turns_example(ids, eos_id, bos_id)
    raise ValueError(f"batch_format must be 'seq2seq' or 'causal', got {batch_format!r}")
