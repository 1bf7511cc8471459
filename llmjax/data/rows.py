"""Batches of whole rows (examples that are not token streams): labelled texts, preference pairs, prompts.

``RowBatches(rows, to_arrays, batch_size=...)`` walks ``rows`` (a list of dicts) in a seed-determined order
per epoch and gives ``to_arrays(list of rows) -> dict of [batch, ...] numpy arrays`` for each global batch,
this process's block of rows only. Like ``llmjax.data.sources.DataIterator`` it is deterministic and exactly
resumable (``state()`` / ``restore()``: the epoch and the position in it), the same on any process layout.
A batch never mixes epochs' orders in a way a resume could not repeat: it takes the next ``batch_size``
rows of the endless sequence epoch 0, epoch 1, ...; with ``num_epochs`` set the iterator stops after that
many epochs and the last batch is short (the caller pads it or drops it).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from llmjax.errors import DataError, InputError


class RowBatches:
    def __init__(self, rows: Sequence[Any], to_arrays: Callable[[list], dict], *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                 name: str = "data"):
        if not rows:
            raise DataError(f"{name} has no rows; give it at least one example")
        if batch_size < 1 or batch_size % process_count:
            raise InputError(f"batch_size={batch_size} must be positive and divisible by the {process_count} processes")
        self.rows, self.to_arrays, self.batch_size, self.seed = rows, to_arrays, batch_size, seed
        self.shuffle, self.num_epochs = shuffle, num_epochs
        per_process = batch_size // process_count
        self._block = slice(process_index * per_process, (process_index + 1) * per_process)
        self._epoch, self._position = 0, 0

    def state(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed, "num_examples": len(self.rows)}

    def restore(self, state: Mapping[str, int]) -> None:
        for key in ("seed", "num_examples"):
            if key in state and state[key] != self.state()[key]:
                raise InputError(f"data state has {key}={state[key]} but this data has {key}={self.state()[key]}; "
                                 "resume with the same data and seed")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.rows)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        taken: list = []
        while len(taken) < self.batch_size:
            if self.num_epochs is not None and self._epoch >= self.num_epochs:
                break
            order = self._order(self._epoch)
            take = min(self.batch_size - len(taken), len(order) - self._position)
            taken.extend(self.rows[i] for i in order[self._position:self._position + take])
            self._position += take
            if self._position == len(order):
                self._epoch, self._position = self._epoch + 1, 0
        if not taken:
            raise StopIteration
        return self.to_arrays(taken[self._block] if len(taken) == self.batch_size else taken)


def encoded_row_batches(batch: Mapping[str, np.ndarray], indices: Sequence[int], **kwargs) -> RowBatches:
    """``RowBatches`` over rows ``indices`` of ``batch`` (every row already encoded: ``[N, ...]`` arrays with a
    ``weight`` ``[N]``); index -1 is a padding row (a copy of row 0 with weight 0). ``kwargs``: RowBatches'."""

    def take(chosen: list[int]) -> dict:
        chosen = np.asarray(chosen)
        out = {name: value[np.maximum(chosen, 0)] for name, value in batch.items()}
        out["weight"] = np.where(chosen >= 0, out["weight"], 0.0).astype(np.float32)
        return out

    return RowBatches(list(indices), take, **kwargs)


def train_and_eval_rows(train_batch: Mapping[str, np.ndarray], eval_batch: Mapping[str, np.ndarray] | None, *,
                        batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                        name: str = "data"):
    """A stage's data from its encoded rows: ``(train_data, eval_data)`` as ``llmjax.train.loop.Stage`` takes them.
    ``train_data`` walks the training rows in seeded epochs (exactly resumable); ``eval_data`` (None without
    ``eval_batch``) gives a fresh pass over the held-out rows in order, the last batch padded with rows of
    weight 0 so every batch has the compiled shape."""
    common = dict(batch_size=batch_size, process_index=process_index, process_count=process_count)
    train_data = encoded_row_batches(train_batch, range(len(train_batch["weight"])), seed=seed, name=name,
                                     **common)
    if eval_batch is None:
        return train_data, None
    count = len(eval_batch["weight"])
    padded = list(range(count)) + [-1] * (-count % batch_size)
    return train_data, lambda: encoded_row_batches(eval_batch, padded, shuffle=False, num_epochs=1,  # noqa: E731
                                                   name=f"{name} (held out)", **common)
