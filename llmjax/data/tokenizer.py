"""SentencePiece tokenizer with T5 conventions, and training a new one from text.

Vocabulary layout (as in T5): ids ``0, 1, 2`` are ``<pad>``, ``</s>`` (eos) and ``<unk>``; there is no
bos; then the SentencePiece pieces; then ``num_extra_ids`` sentinels at the top, in descending order:
``<extra_id_0>`` is ``vocab_size - 1``, ``<extra_id_1>`` is ``vocab_size - 2``, and so on. The
sentinels are not in the SentencePiece model; this wrapper adds them, exactly as ``transformers``'
``T5Tokenizer`` does, so the ``spiece.model`` file is interchangeable with Hugging Face's.

Special tokens written in the text (``<extra_id_3>``, ``</s>``, ``<pad>``, ``<unk>``) become their ids
and the text between them is encoded piece by piece, each chunk with its own leading-space marker:
this is what ``T5TokenizerFast`` does, and the tests check that both give the same ids.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from llmjax.errors import UserError

SPIECE_NAME = "spiece.model"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
PAD_PIECE, EOS_PIECE, UNK_PIECE = "<pad>", "</s>", "<unk>"
DEFAULT_NUM_EXTRA_IDS = 100
WORD_BOUNDARY = "\u2581"  # SentencePiece's visible space, "▁"
PADDING_MODES = ("max_length", "longest")


class TokenizerError(UserError, ValueError):
    """A tokenizer file or call that cannot work, with the reason and the fix."""


class Tokenizer:
    """A SentencePiece model plus ``num_extra_ids`` T5 sentinels at the top of the vocabulary."""

    pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID

    def __init__(self, model_proto: bytes, num_extra_ids: int = DEFAULT_NUM_EXTRA_IDS):
        if num_extra_ids < 0:
            raise TokenizerError(f"num_extra_ids must be >= 0, got {num_extra_ids}")
        self.model_proto = model_proto
        self.num_extra_ids = num_extra_ids
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._check_special_ids()
        self._piece_count = self._sp.get_piece_size()
        # Alternation order does not matter: no special string is a prefix of another (they end in ">").
        self._specials = {PAD_PIECE: PAD_ID, EOS_PIECE: EOS_ID, UNK_PIECE: UNK_ID}
        self._specials.update({self.sentinel_token(i): self.sentinel_id(i) for i in range(num_extra_ids)})
        self._special_pattern = re.compile("(" + "|".join(re.escape(s) for s in self._specials) + ")")

    def _check_special_ids(self) -> None:
        expected = {PAD_ID: PAD_PIECE, EOS_ID: EOS_PIECE, UNK_ID: UNK_PIECE}
        found = {i: self._sp.id_to_piece(i) for i in expected if i < self._sp.get_piece_size()}
        if found != expected or self._sp.bos_id() != -1:
            raise TokenizerError(
                f"SentencePiece model has ids 0-2 = {found} and bos id {self._sp.bos_id()}; T5 conventions need "
                f"{expected} and no bos. Train it with llmjax.data.tokenizer.train_tokenizer (or pad_id=0, eos_id=1, "
                "unk_id=2, bos_id=-1)"
            )

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def load(cls, path: str | Path, num_extra_ids: int | None = None) -> "Tokenizer":
        """Load ``spiece.model`` (a file, or a directory holding one).

        ``num_extra_ids`` defaults to ``extra_ids`` from the directory's ``tokenizer_config.json``,
        else 100 (T5's value).
        """
        path = Path(path)
        model_file = path / SPIECE_NAME if path.is_dir() else path
        if not model_file.is_file():
            where = f"directory {path} has no {SPIECE_NAME}" if path.is_dir() else f"{path}: no such file"
            raise TokenizerError(
                f"{where}; pass a SentencePiece model file or a directory containing {SPIECE_NAME} "
                "(train one with `llmjax tokenizer train`)"
            )
        if num_extra_ids is None:
            config_file = model_file.parent / "tokenizer_config.json"
            try:
                config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
                num_extra_ids = int(config.get("extra_ids", DEFAULT_NUM_EXTRA_IDS))
            except (ValueError, AttributeError, TypeError) as e:  # not JSON, not an object, extra_ids not a number
                raise TokenizerError(f"{config_file}: unreadable tokenizer config ({e})") from None
        try:
            return cls(model_file.read_bytes(), num_extra_ids)
        except RuntimeError as e:  # sentencepiece's parse failure
            raise TokenizerError(f"{model_file}: not a SentencePiece model ({e})") from None

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a Hugging Face tokenizer directory: spiece.model, tokenizer.json, and the configs.

        ``transformers.AutoTokenizer.from_pretrained(directory)`` then encodes and decodes as this does.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SPIECE_NAME).write_bytes(self.model_proto)
        sentinels = [self.sentinel_token(i) for i in range(self.num_extra_ids)]
        special_tokens = {"eos_token": EOS_PIECE, "unk_token": UNK_PIECE, "pad_token": PAD_PIECE,
                          "additional_special_tokens": sentinels}
        config = {"tokenizer_class": "T5Tokenizer", "extra_ids": self.num_extra_ids, **special_tokens,
                  # No "clean up" of spaces before punctuation: decode(encode(text)) must give text back.
                  "clean_up_tokenization_spaces": False}
        _write_json(directory / "tokenizer_config.json", config)
        _write_json(directory / "special_tokens_map.json", special_tokens)
        _write_json(directory / "tokenizer.json", self._tokenizers_json())
        return directory

    def _tokenizers_json(self) -> dict:
        """The ``tokenizers`` library's serialization of the same pipeline T5TokenizerFast builds."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(self.model_proto)
        vocab = [[p.piece, p.score] for p in proto.pieces]
        vocab += [[self.sentinel_token(i), 0.0] for i in reversed(range(self.num_extra_ids))]
        charsmap = proto.normalizer_spec.precompiled_charsmap
        metaspace = {"type": "Metaspace", "replacement": WORD_BOUNDARY, "prepend_scheme": "always", "split": True}
        sequence = {"Sequence": {"id": "A", "type_id": 0}}
        eos = {"SpecialToken": {"id": EOS_PIECE, "type_id": 0}}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": token_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
                for token, token_id in sorted(self._specials.items(), key=lambda item: item[1])
            ],
            "normalizer": ({"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode()}
                           if charsmap else None),
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [sequence, eos],
                "pair": [sequence, eos, {"Sequence": {"id": "B", "type_id": 0}}, eos],
                "special_tokens": {EOS_PIECE: {"id": EOS_PIECE, "ids": [EOS_ID], "tokens": [EOS_PIECE]}},
            },
            "decoder": metaspace,
            "model": {"type": "Unigram", "unk_id": UNK_ID, "vocab": vocab, "byte_fallback": False},
        }

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return self._piece_count + self.num_extra_ids

    def sentinel_id(self, index: int) -> int:
        """Id of ``<extra_id_{index}>``: ``vocab_size - 1 - index``."""
        if not 0 <= index < self.num_extra_ids:
            raise TokenizerError(f"sentinel index {index} out of range: this tokenizer has {self.num_extra_ids}")
        return self.vocab_size - 1 - index

    @staticmethod
    def sentinel_token(index: int) -> str:
        return f"<extra_id_{index}>"

    def id_to_token(self, token_id: int) -> str:
        if token_id >= self._piece_count:
            return self.sentinel_token(self.vocab_size - 1 - token_id)
        return self._sp.id_to_piece(token_id)

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        """Token ids of ``text``, with eos appended unless ``add_eos=False``."""
        return self._encode_many([text], add_eos)[0]

    def _encode_many(self, texts: Sequence[str], add_eos: bool) -> list[list[int]]:
        # Split every text at special tokens, encode all plain chunks in one SentencePiece call.
        split = [self._special_pattern.split(text) for text in texts]
        chunks = [part for parts in split for part in parts[0::2]]
        encoded = iter(self._sp.encode(chunks, out_type=int))
        result = []
        for parts in split:
            ids = []
            for position, part in enumerate(parts):
                ids.extend(next(encoded) if position % 2 == 0 else [self._specials[part]])
            if add_eos:
                ids.append(EOS_ID)
            result.append(ids)
        return result

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None, padding: str = "max_length",
                     truncation: bool = True, add_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Encode, truncate and right-pad a batch.

        Returns ``(ids, mask)``, both int32 ``[batch, length]``: ``length`` is ``max_length`` with
        ``padding="max_length"``, the longest sequence (at most ``max_length``) with ``"longest"``;
        ``mask`` is 1 on tokens, 0 on padding. A truncated sequence keeps its eos as the last token
        (as seqio and ``transformers`` do). With ``truncation=False`` a sequence longer than
        ``max_length`` is an error.
        """
        if isinstance(texts, str):
            raise TokenizerError("encode_batch takes a list of texts; for one text use encode(text)")
        if padding not in PADDING_MODES:
            raise TokenizerError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
        if max_length is None and padding == "max_length":
            raise TokenizerError('padding="max_length" needs max_length; pass max_length or padding="longest"')
        if max_length is not None and max_length < 1:
            raise TokenizerError(f"max_length must be >= 1, got {max_length}")
        sequences = self._encode_many(texts, add_eos)
        if max_length is not None:
            for index, ids in enumerate(sequences):
                if len(ids) <= max_length:
                    continue
                if not truncation:
                    raise TokenizerError(
                        f"text {index} has {len(ids)} tokens, more than max_length={max_length}; "
                        "raise max_length or pass truncation=True"
                    )
                sequences[index] = ids[: max_length - 1] + [EOS_ID] if add_eos else ids[:max_length]
        length = max_length if padding == "max_length" else max((len(ids) for ids in sequences), default=0)
        ids_array = np.full((len(sequences), length), PAD_ID, np.int32)
        mask = np.zeros((len(sequences), length), np.int32)
        for row, ids in enumerate(sequences):
            ids_array[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        return ids_array, mask

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or 1-D array). Skipping drops pad, eos, unk and sentinels, as HF does."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids {bad[:5]} are outside this tokenizer's vocabulary [0, {self.vocab_size})")
        if skip_special_tokens:
            ids = [i for i in ids if i > UNK_ID and i < self._piece_count]
        # Join pieces and turn "▁" into spaces; the first piece's marker is the added dummy prefix.
        text = "".join(self.id_to_token(i) for i in ids).replace(WORD_BOUNDARY, " ")
        return text[1:] if text.startswith(" ") else text

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        """``decode`` of each row of a list or a ``[batch, length]`` array."""
        return [self.decode(ids, skip_special_tokens) for ids in batch]


# ---------------------------------------------------------------------- training
def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int, model_type: str = "unigram",
                    num_extra_ids: int = DEFAULT_NUM_EXTRA_IDS, seed: int = 0,
                    character_coverage: float = 1.0, num_threads: int = 1) -> Tokenizer:
    """Train a T5-style SentencePiece tokenizer on ``texts`` and save it to ``out_dir``.

    ``vocab_size`` counts everything: the SentencePiece model gets ``vocab_size - num_extra_ids``
    pieces (pad, eos, unk included) and the sentinels fill the top. ``out_dir`` receives what
    ``Tokenizer.save_pretrained`` writes. Multi-line texts are split into lines (SentencePiece's
    unit of training). The same texts and seed give the same model.
    """
    if model_type != "unigram":
        # transformers' T5Tokenizer rebuilds every spiece.model as a Unigram model, so only that agrees.
        raise TokenizerError(f"model_type must be 'unigram' (T5 tokenizers are Unigram models), got {model_type!r}")
    piece_count = vocab_size - num_extra_ids
    if num_extra_ids < 0 or piece_count < 4:
        raise TokenizerError(
            f"vocab_size={vocab_size} leaves {piece_count} pieces after {num_extra_ids} sentinels; "
            "need at least 4 (pad, eos, unk and one piece): raise vocab_size"
        )
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, vocab_size=piece_count, model_type=model_type,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, character_coverage=character_coverage,
            byte_fallback=False, num_threads=num_threads, max_sentence_length=1 << 16, minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e)
        if "Vocabulary size" in message or "vocab_size" in message:
            raise TokenizerError(
                f"cannot train {piece_count} pieces from this text ({message.strip()}); "
                "lower vocab_size or give more text"
            ) from None
        raise TokenizerError(f"SentencePiece training failed: {message.strip()}") from None
    tokenizer = Tokenizer(model.getvalue(), num_extra_ids)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
