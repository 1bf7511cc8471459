"""Row batches: every row once per epoch in a seeded order, exact resume, process blocks, a clear error on no rows;
a stage's data from encoded rows, its held-out pass padded with rows of weight 0."""

import numpy as np
import pytest

from llmjax.data.rows import RowBatches, train_and_eval_rows
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


def test_encoded_rows_train_in_seeded_epochs_and_evaluate_once_padded_with_weight_0():
    encoded = {"x": np.arange(10) * 10, "weight": np.ones(10, np.float32)}
    held_out = {"x": np.arange(5) + 100, "weight": np.asarray([1, 1, 1, 1, 0.5], np.float32)}
    train_data, eval_data = train_and_eval_rows(encoded, held_out, batch_size=4, seed=3)
    epoch = np.concatenate([next(train_data)["x"] for _ in range(5)])[:10]  # 2.5 batches of 4 per epoch
    assert sorted(epoch) == list(range(0, 100, 10))
    for _ in range(2):  # each call is a fresh pass: all 5 rows in order, the last batch padded to 4
        batches = list(eval_data())
        assert [len(b["x"]) for b in batches] == [4, 4]
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]),
                                      [100, 101, 102, 103, 104, 100, 100, 100])
        np.testing.assert_array_equal(np.concatenate([b["weight"] for b in batches]), [1, 1, 1, 1, 0.5, 0, 0, 0])
    assert train_and_eval_rows(encoded, None, batch_size=4, seed=3)[1] is None
