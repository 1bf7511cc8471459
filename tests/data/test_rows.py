"""Row batches: every row once per epoch in a seeded order, exact resume, process blocks, a clear error on no rows."""

import numpy as np
import pytest

from llmjax.data.rows import RowBatches
from llmjax.errors import DataError

ROWS = [{"x": i} for i in range(10)]


def _arrays(rows):
    return {"x": np.asarray([r["x"] for r in rows])}


def test_each_epoch_visits_every_row_once_in_a_seeded_order():
    it = RowBatches(ROWS, _arrays, batch_size=5, seed=3)
    first = np.concatenate([next(it)["x"], next(it)["x"]])
    assert sorted(first) == list(range(10)) and list(first) != list(range(10))
    again = RowBatches(ROWS, _arrays, batch_size=5, seed=3)
    np.testing.assert_array_equal(np.concatenate([next(again)["x"], next(again)["x"]]), first)


def test_resume_continues_exactly_across_epochs():
    it = RowBatches(ROWS, _arrays, batch_size=4, seed=1)
    for _ in range(3):
        next(it)
    state = it.state()
    expected = [next(it)["x"] for _ in range(4)]
    resumed = RowBatches(ROWS, _arrays, batch_size=4, seed=1)
    resumed.restore(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["x"], want)


def test_processes_take_their_block_of_the_global_batch():
    whole = next(RowBatches(ROWS, _arrays, batch_size=4, seed=0))["x"]
    parts = [next(RowBatches(ROWS, _arrays, batch_size=4, seed=0, process_index=p, process_count=2))["x"]
             for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_num_epochs_stops_and_empty_rows_are_refused():
    it = RowBatches(ROWS, _arrays, batch_size=4, shuffle=False, num_epochs=1)
    assert [len(b["x"]) for b in it] == [4, 4, 2]
    with pytest.raises(DataError, match="no rows"):
        RowBatches([], _arrays, batch_size=2)
