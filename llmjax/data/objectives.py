"""Training objectives: token ids in, 1-D example features (batch.py names) out. Pure numpy.

* T5 span corruption (Raffel et al. 2020, section 3.1.4): drop ~15% of tokens in spans of mean length 3;
  every dropped span becomes one sentinel in the inputs, and the targets list each sentinel followed by
  the tokens it replaced.
* Causal LM: predict token ``i+1`` from tokens ``0..i``.
* Instruction formatting: a prompt and a target, with loss on the target only.

Every function returns a dict of int32 arrays ``[length]`` named as in ``llmjax.batch``; packing.py turns
lists of them into ``[batch, length]`` rows. Randomness comes only from the ``np.random.Generator`` passed
in, so the same generator state gives the same example.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from string import Formatter

import numpy as np

from llmjax.batch import shift_right

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def _as_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D list of token ids, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {array.dtype}")
    return array.astype(np.int32)


# ----------------------------------------------------------------------------------------------- span corruption


def span_counts(
    length: int, noise_density: float = NOISE_DENSITY, mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
) -> tuple[int, int]:
    """``(num_noise_tokens, num_noise_spans)`` for a sequence of ``length >= 2`` tokens.

    noise tokens = round(length * density) clipped to [1, length - 1]; spans = round(noise / mean span
    length), at least 1 and at most the number of non-noise tokens (every noise span needs a non-noise
    span before it).
    """
    num_noise = int(np.clip(round(length * noise_density), 1, length - 1))
    num_spans = max(1, int(round(num_noise / mean_noise_span_length)))
    return num_noise, min(num_spans, length - num_noise)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``num_items`` into ``num_segments`` random positive lengths (uniform over compositions)."""
    # Choose num_segments - 1 distinct cut points among the num_items - 1 gaps between items.
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    boundaries = np.concatenate([[0], cuts, [num_items]])
    return np.diff(boundaries)


def random_spans_noise_mask(
    length: int,
    rng: np.random.Generator,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> np.ndarray:
    """Boolean mask ``[length]``, True on noise tokens: alternating non-noise/noise spans, non-noise first.

    A 1-token sequence is masked as if it had 2 tokens and cropped (so it is never noised).
    """
    if length < 1:
        raise ValueError("span corruption needs at least 1 token, got an empty sequence")
    padded_length = max(length, 2)
    num_noise, num_spans = span_counts(padded_length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(padded_length - num_noise, num_spans, rng)
    span_lengths = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    is_noise = np.tile([False, True], num_spans)
    return np.repeat(is_noise, span_lengths)[:length]


def apply_noise_mask(
    tokens: Sequence[int] | np.ndarray, noise_mask: np.ndarray, sentinel_ids: Sequence[int], eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)`` int32 from tokens and a noise mask.

    inputs: each noise span replaced by the next sentinel (sentinel_ids[0] = extra_id_0, ...), then eos.
    targets: for each noise span, its sentinel then its tokens, then eos.
    """
    tokens = _as_tokens(tokens)
    noise_mask = np.asarray(noise_mask, dtype=bool)
    if noise_mask.shape != tokens.shape:
        raise ValueError(f"noise mask shape {noise_mask.shape} does not match tokens shape {tokens.shape}")
    span_starts = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])
    num_spans = int(span_starts.sum())
    if num_spans > len(sentinel_ids):
        raise ValueError(
            f"{num_spans} noise spans but only {len(sentinel_ids)} sentinel ids; pass more sentinels "
            "or shorten the sequence"
        )
    sentinel_of_span = np.asarray(sentinel_ids[:num_spans], dtype=np.int32)
    eos = np.asarray([eos_id], dtype=np.int32)

    inputs = tokens.copy()
    inputs[span_starts] = sentinel_of_span
    inputs = inputs[~noise_mask | span_starts]  # a span keeps only its first slot, now its sentinel

    noise_tokens = tokens[noise_mask]
    span_start_in_noise = np.cumsum(noise_mask)[span_starts] - 1  # where each span begins in noise_tokens
    targets = np.insert(noise_tokens, span_start_in_noise, sentinel_of_span)
    return np.concatenate([inputs, eos]).astype(np.int32), np.concatenate([targets, eos]).astype(np.int32)


def span_corruption_example(
    tokens: Sequence[int] | np.ndarray,
    rng: np.random.Generator,
    sentinel_ids: Sequence[int],
    eos_id: int,
    decoder_start_id: int = 0,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> dict[str, np.ndarray]:
    """T5 span-corruption example (seq2seq features, 1-D int32) from raw token ids (no eos)."""
    tokens = _as_tokens(tokens)
    mask = random_spans_noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
    inputs, targets = apply_noise_mask(tokens, mask, sentinel_ids, eos_id)
    return seq2seq_features(inputs, targets, decoder_start_id)


def span_corruption_lengths(
    tokens_length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """``(inputs_length, targets_length)`` that span corruption makes from ``tokens_length`` raw tokens.

    inputs keep the non-noise tokens plus one sentinel per span plus eos; targets hold the noise tokens
    plus one sentinel per span plus eos.
    """
    if tokens_length < 2:  # a 1-token sequence is never noised (see random_spans_noise_mask)
        return tokens_length + 1, 1
    num_noise, num_spans = span_counts(tokens_length, noise_density, mean_noise_span_length)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_budget(
    inputs_length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """``(tokens_length, targets_length)``: the most raw tokens whose corrupted inputs fit ``inputs_length``.

    Take chunks of ``tokens_length`` raw tokens so encoder rows of ``inputs_length`` are full; decoder rows
    then need ``targets_length``. (T5 with 512 inputs: 568 raw tokens, 114 targets.)
    """
    if span_corruption_lengths(1, noise_density, mean_noise_span_length)[0] > inputs_length:
        raise ValueError(f"inputs_length must be at least 2 (one token plus eos), got {inputs_length}")
    # Inputs length grows by 0 or 1 per extra raw token (up to rounding), so walk from inputs_length to the
    # last raw length that still fits: a few dozen steps for real lengths.
    tokens_length = inputs_length
    while span_corruption_lengths(tokens_length, noise_density, mean_noise_span_length)[0] > inputs_length:
        tokens_length -= 1
    while span_corruption_lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, span_corruption_lengths(tokens_length, noise_density, mean_noise_span_length)[1]


def document_span_corruption_fn(
    tokenizer,
    encoder_length: int,
    decoder_length: int,
    decoder_start_id: int = 0,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
    text_field: str = "text",
):
    """``fn(row, rng) -> [examples]``: a document row tokenized (``tokenizer.encode``, ``eos_id``,
    ``sentinel_id``, ``num_extra_ids``) and cut into chunks whose span-corrupted inputs fill
    ``encoder_length`` tokens; one seq2seq example per chunk (None for an empty document).

    Raises ValueError when the chunks' targets would not fit ``decoder_length``.
    """
    chunk, targets_length = span_corruption_budget(encoder_length, noise_density, mean_noise_span_length)
    if targets_length > decoder_length:
        raise ValueError(f"span corruption of {encoder_length}-token inputs makes targets of {targets_length} "
                         f"tokens, more than decoder_length={decoder_length}")
    sentinels = [tokenizer.sentinel_id(i) for i in range(tokenizer.num_extra_ids)]

    def span_corruption(row, rng: np.random.Generator):
        ids = np.asarray(tokenizer.encode(row[text_field], add_eos=False), np.int32)
        return [
            span_corruption_example(ids[i:i + chunk], rng, sentinels, tokenizer.eos_id, decoder_start_id,
                                    noise_density, mean_noise_span_length)
            for i in range(0, len(ids), chunk)
        ] or None

    return span_corruption


# ----------------------------------------------------------------------------------------------- causal LM


def causal_lm_example(tokens: Sequence[int] | np.ndarray, eos_id: int | None = None) -> dict[str, np.ndarray]:
    """Decoder-only features: inputs ``tokens[:-1]``, targets ``tokens[1:]``, every target weighted 1.

    ``eos_id`` (if given) is appended first, so the model learns where documents end. Needs >= 2 tokens.
    """
    tokens = _as_tokens(tokens)
    if eos_id is not None:
        tokens = np.append(tokens, np.int32(eos_id))
    if len(tokens) < 2:
        raise ValueError(f"causal LM needs at least 2 tokens (with eos), got {len(tokens)}")
    return {
        "decoder_input_tokens": tokens[:-1],
        "decoder_target_tokens": tokens[1:],
        "decoder_loss_weights": np.ones(len(tokens) - 1, dtype=np.int32),
    }


# ----------------------------------------------------------------------------------------------- instructions


def seq2seq_features(
    inputs: Sequence[int] | np.ndarray, targets: Sequence[int] | np.ndarray, decoder_start_id: int = 0
) -> dict[str, np.ndarray]:
    """Seq2seq features from finished encoder inputs and decoder targets (eos already appended)."""
    inputs, targets = _as_tokens(inputs), _as_tokens(targets)
    if len(targets) == 0:
        raise ValueError("seq2seq example has no target tokens")
    return {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": shift_right(targets, decoder_start_id),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones(len(targets), dtype=np.int32),
    }


def seq2seq_instruction_example(
    prompt_ids: Sequence[int] | np.ndarray,
    target_ids: Sequence[int] | np.ndarray,
    eos_id: int,
    decoder_start_id: int = 0,
) -> dict[str, np.ndarray]:
    """Encoder reads ``prompt + eos``; decoder predicts ``target + eos`` (loss on every target token)."""
    eos = [eos_id]
    inputs = np.concatenate([_as_tokens(prompt_ids), eos])
    targets = np.concatenate([_as_tokens(target_ids), eos])
    return seq2seq_features(inputs, targets, decoder_start_id)


def decoder_instruction_example(
    prompt_ids: Sequence[int] | np.ndarray,
    target_ids: Sequence[int] | np.ndarray,
    eos_id: int,
    bos_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Causal LM over ``[bos] + prompt + target + eos`` with weight 0 on every prediction of a prompt token.

    The first position that predicts a target token is the last prompt token's, so exactly
    ``len(target) + 1`` weights are 1 (target and eos).
    """
    return decoder_turns_example([(prompt_ids, False), (target_ids, True)], eos_id, bos_id)


def decoder_turns_example(
    pieces: Sequence[tuple[Sequence[int] | np.ndarray, bool]],
    eos_id: int,
    bos_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Causal LM over ``[bos] + piece_1 + piece_2 + ...`` with loss only on the pieces marked trained.

    ``pieces`` are ``(token ids, trained)`` in order: prompts and chat headers untrained, responses and
    assistant turns trained. Every trained piece is followed by ``eos`` (trained too), so the model learns
    where its turn ends. A weight is 1 exactly where the *target* token belongs to a trained piece.
    """
    tokens, trained = ([] if bos_id is None else [bos_id]), ([] if bos_id is None else [False])
    for ids, is_trained in pieces:
        ids = _as_tokens(ids).tolist() + ([eos_id] if is_trained else [])
        tokens += ids
        trained += [is_trained] * len(ids)
    if not any(trained):
        raise ValueError("decoder example has no trained piece (no response or assistant turn)")
    if not trained.index(True):
        raise ValueError("decoder-only instruction example needs a non-empty prompt or a bos_id to predict from")
    tokens_array = np.asarray(tokens, dtype=np.int32)
    return {
        "decoder_input_tokens": tokens_array[:-1],
        "decoder_target_tokens": tokens_array[1:],
        "decoder_loss_weights": np.asarray(trained[1:], dtype=np.int32),
    }


def render_template(template: str, example: Mapping[str, object]) -> str:
    """Fill ``{field}`` slots of a ``str.format`` template from an example, naming any missing field."""
    fields = {name for _, name, _, _ in Formatter().parse(template) if name}
    missing = sorted(fields - set(example))
    if missing:
        raise KeyError(f"template {template!r} needs field(s) {missing}, example has {sorted(example)}")
    return template.format(**{name: example[name] for name in fields})


def instruction_example(
    example: Mapping[str, object],
    prompt_template: str,
    target_template: str,
    encode: Callable[[str], Sequence[int]],
    eos_id: int,
    batch_format: str,
    bos_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Render both templates, encode them, and build ``"seq2seq"`` or ``"causal"`` (decoder-only) features."""
    prompt_ids = encode(render_template(prompt_template, example))
    target_ids = encode(render_template(target_template, example))
    if batch_format == "seq2seq":
        return seq2seq_instruction_example(prompt_ids, target_ids, eos_id)
    if batch_format == "causal":
        return decoder_instruction_example(prompt_ids, target_ids, eos_id, bos_id)
    raise ValueError(f"batch_format must be 'seq2seq' or 'causal', got {batch_format!r}")
