"""Pack variable-length examples into fixed-length rows with segment ids and positions.

An example is a dict of 1-D int arrays named as in ``llmjax.batch`` (objectives.py makes them):
seq2seq examples have an encoder side (``encoder_input_tokens``) and a decoder side (``decoder_input_tokens``,
``decoder_target_tokens``, ``decoder_loss_weights``); decoder-only examples only the decoder side.

Packing is greedy first-fit: each example goes into the first open row where both of its sides fit, else it
opens a new row. Both sides of one example get the same segment id (1-based within the row; 0 = padding),
and positions restart at 0 in every segment. Padding has token 0 and loss weight 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from llmjax.batch import DECODER_FEATURES, ENCODER_FEATURES

_SIDE_FEATURES = {"encoder": ENCODER_FEATURES, "decoder": DECODER_FEATURES}


class RowPacker:
    """Accumulates examples into rows; ``to_batch()`` returns ``[rows, length]`` int32 arrays.

    Args:
      decoder_length: row length of the decoder side.
      encoder_length: row length of the encoder side; ``None`` for decoder-only examples.
      max_rows: stop accepting examples (``add`` returns False) once this many rows are open and the next
        example fits none of them; ``None`` for no limit.
      max_segments_per_row: ``1`` pads one example per row (no packing); ``None`` for no limit.
      truncate: cut an example longer than a row to the row length instead of raising.
    """

    def __init__(
        self,
        decoder_length: int,
        encoder_length: int | None = None,
        max_rows: int | None = None,
        max_segments_per_row: int | None = None,
        truncate: bool = False,
    ):
        self.row_lengths = {"decoder": decoder_length}
        if encoder_length is not None:
            self.row_lengths["encoder"] = encoder_length
        for side, length in self.row_lengths.items():
            if length < 1:
                raise ValueError(f"{side}_length must be positive, got {length}")
        self.max_rows = max_rows
        self.max_segments_per_row = max_segments_per_row
        self.truncate = truncate
        self._rows: list[list[dict[str, np.ndarray]]] = []
        self._used: list[dict[str, int]] = []  # tokens used per side, per row
        self.truncated = {side: 0 for side in self.row_lengths}  # examples placed after cutting that side

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def num_examples(self) -> int:
        """Examples placed so far (several per row when packing)."""
        return sum(len(row) for row in self._rows)

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(name for side in self.row_lengths for name in _SIDE_FEATURES[side])

    def add(self, example: Mapping[str, np.ndarray], index: int | None = None) -> bool:
        """Place ``example`` in the first row it fits; False (and nothing changes) if all rows are taken.

        ``index`` names the example in error messages (its position in the source).
        """
        example, cut = self._checked(example, index)
        sizes = {side: len(example[_SIDE_FEATURES[side][0]]) for side in self.row_lengths}
        for row, used in zip(self._rows, self._used):
            if self._fits(row, used, sizes):
                row.append(example)
                for side, size in sizes.items():
                    used[side] += size
                break
        else:
            if self.max_rows is not None and len(self._rows) >= self.max_rows:
                return False
            self._rows.append([example])
            self._used.append(dict(sizes))
        for side in cut:
            self.truncated[side] += 1
        return True

    def to_batch(self, num_rows: int | None = None, include_segments: bool = True) -> dict[str, np.ndarray]:
        """``[num_rows, length]`` int32 features (default: as many rows as are open; extra rows are padding).

        With ``include_segments`` the batch also has ``*_segment_ids`` and ``*_positions``.
        """
        num_rows = len(self._rows) if num_rows is None else num_rows
        if num_rows < len(self._rows):
            raise ValueError(f"num_rows {num_rows} is smaller than the {len(self._rows)} rows already packed")
        batch = {}
        for side, length in self.row_lengths.items():
            names = _SIDE_FEATURES[side] + ((f"{side}_segment_ids", f"{side}_positions") if include_segments else ())
            for name in names:
                batch[name] = np.zeros((num_rows, length), dtype=np.int32)
            for row_index, row in enumerate(self._rows):
                start = 0
                for segment_id, example in enumerate(row, start=1):
                    size = len(example[_SIDE_FEATURES[side][0]])
                    window = slice(start, start + size)
                    for name in _SIDE_FEATURES[side]:
                        batch[name][row_index, window] = example[name]
                    if include_segments:
                        batch[f"{side}_segment_ids"][row_index, window] = segment_id
                        batch[f"{side}_positions"][row_index, window] = np.arange(size)
                    start += size
        return batch

    def _fits(self, row: list, used: dict[str, int], sizes: dict[str, int]) -> bool:
        if self.max_segments_per_row is not None and len(row) >= self.max_segments_per_row:
            return False
        return all(used[side] + sizes[side] <= self.row_lengths[side] for side in sizes)

    def _checked(self, example: Mapping[str, np.ndarray], index: int | None) -> tuple[dict[str, np.ndarray], list[str]]:
        """The example's features as int32 arrays, truncated if allowed, and the sides that were cut; errors name
        the example."""
        name = "example" if index is None else f"example {index}"
        expected = set(self.features)
        if set(example) != expected:
            kind = "seq2seq" if "encoder" in self.row_lengths else "decoder-only"
            raise ValueError(
                f"{name} has features {sorted(example)}, but {kind} packing expects {sorted(expected)}"
                + (" (pass encoder_length for seq2seq examples)" if "encoder_input_tokens" in example else "")
            )
        checked, cut = {}, []
        for side, row_length in self.row_lengths.items():
            arrays = [np.asarray(example[feature]) for feature in _SIDE_FEATURES[side]]
            sizes = {array.shape for array in arrays}
            if len(sizes) != 1 or len(arrays[0].shape) != 1:
                raise ValueError(f"{name}: {side} features must be 1-D with one length, got shapes {sorted(sizes)}")
            size = len(arrays[0])
            if size == 0:  # an empty side would leave its segment with nothing to attend to
                raise ValueError(f"{name} has no {side} tokens; drop it before packing")
            if size > row_length:
                if not self.truncate:
                    raise ValueError(
                        f"{name} has {side} length {size}, longer than the row length {row_length}; "
                        "raise the length, drop the example, or pass truncate=True"
                    )
                arrays = [array[:row_length] for array in arrays]
                cut.append(side)
            for feature, array in zip(_SIDE_FEATURES[side], arrays):
                checked[feature] = array.astype(np.int32)
        return checked, cut


def pack_examples(
    examples: Iterable[Mapping[str, np.ndarray]],
    decoder_length: int,
    encoder_length: int | None = None,
    truncate: bool = False,
    max_segments_per_row: int | None = None,
) -> dict[str, np.ndarray]:
    """Pack all examples (first-fit) into as many rows as needed: ``[rows, length]`` int32 features."""
    packer = RowPacker(decoder_length, encoder_length, max_segments_per_row=max_segments_per_row, truncate=truncate)
    for index, example in enumerate(examples):
        packer.add(example, index)
    return packer.to_batch()
