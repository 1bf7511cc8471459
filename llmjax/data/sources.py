"""Example sources and the deterministic, resumable iterator that turns them into batches.

A *source* is random access: ``len(source)`` and ``source[i] -> dict`` (one raw example, e.g.
``{"text": ...}``). Random access is what makes shuffling and exact resumption cheap: the
iterator's whole state is ``(epoch, position, offset, seed)``.

Sources here: JSONL, plain text, Parquet (pyarrow), Hugging Face ``datasets`` on local files or a saved dataset
directory, TFDS / seqio (optional extra), ``MappedSource`` (per-source field mapping) and ``Mixture``
(weighted sampling across sources). ``DataIterator`` runs source -> ``example_fn`` (tokenize + objective)
-> packing into ``[batch, length]`` int32 batches named as in ``llmjax.batch``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llmjax.data.packing import RowPacker
from llmjax.errors import DataError, InputError, InputNotFoundError

SEQIO_HINT = "pip install 'llmjax[seqio]'"


class Source(Protocol):
    """Random-access examples: ``len(source)`` and ``source[i] -> dict``.

    File sources take ``fields``: the text fields the pipeline reads; each row must hold each of them
    as a string, and the source returns only those (None: whole rows, unchecked).
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def _require_fields(example: Mapping[str, Any], fields: Sequence[str] | None, where: str) -> dict[str, Any]:
    """The example restricted to ``fields`` (all of it if None); each must be present and a string."""
    if fields is None:
        return dict(example)
    for field in fields:
        value = example.get(field)
        if value is None:
            raise DataError(f"{where} has no field {field!r} (it has {sorted(example)})")
        if not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return {field: example[field] for field in fields}


def _existing_file(path: str | Path, kind: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{kind} file {path} does not exist")
    return path


def _check_columns(columns: Mapping[str, bool], fields: Sequence[str] | None, name: str) -> None:
    """Columnar sources know up front that a field is absent from every row, or not text: say so at construction.

    ``columns``: column name -> whether it holds strings.
    """
    for field in fields or ():
        if field not in columns:
            raise DataError(f"{name} row 0 has no field {field!r} (columns: {list(columns)})")
        if not columns[field]:
            raise DataError(f"{name}: field {field!r} must be a string column")


def _check_index(index: int, length: int, what: str) -> int:
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for {what} with {length} examples")
    return index % length


class _LineFile:
    """The non-blank lines of a UTF-8 file, indexed by byte offset (rows are read on demand, not held)."""

    def __init__(self, path: str | Path, kind: str):
        self.path = _existing_file(path, kind)
        self._offsets: list[int] = []  # byte offset of each non-blank line
        self._line_numbers: list[int] = []
        with self.path.open("rb") as f:
            offset = 0
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    self._offsets.append(offset)
                    self._line_numbers.append(line_number)
                    self._check_line(self._decode(line, line_number), self._where(len(self._offsets) - 1))
                offset += len(line)

    def _check_line(self, text: str, where: str) -> None:
        """Raise ``DataError`` if the row is unusable; called for every row when the file is opened."""

    def _where(self, index: int) -> str:
        return f"{self.path} line {self._line_numbers[index]} (row {index})"

    def _decode(self, line: bytes, line_number: int) -> str:
        try:
            return line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path} line {line_number}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    def __len__(self) -> int:
        return len(self._offsets)

    def _line(self, index: int) -> tuple[str, str]:
        """``(text, where)`` of row ``index``."""
        index = _check_index(index, len(self), str(self.path))
        with self.path.open("rb") as f:
            f.seek(self._offsets[index])
            line = f.readline()
        return self._decode(line, self._line_numbers[index]), self._where(index)


class TextSource(_LineFile):
    """A plain text file, one document per non-blank line: ``source[i] == {field: line}``."""

    def __init__(self, path: str | Path, field: str = "text"):
        self.field = field
        super().__init__(path, "text")

    def __getitem__(self, index: int) -> dict[str, Any]:
        text, _ = self._line(index)
        return {self.field: text}


class JsonlSource(_LineFile):
    """One JSON object per line; blank lines are skipped. Every row is checked when the file is opened
    (JSON object, ``fields`` present and strings), so a bad row stops a run before it starts, naming the
    file, the line and the field; rows are then read by byte offset, not held in memory."""

    def __init__(self, path: str | Path, fields: Sequence[str] | None = None):
        self.fields = fields
        super().__init__(path, "JSONL")

    def _parse(self, text: str, where: str) -> dict[str, Any]:
        try:
            example = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{where} is not valid JSON: {error.msg} (column {error.colno})") from None
        if not isinstance(example, dict):
            raise DataError(f"{where} is a JSON {type(example).__name__}, expected an object")
        return _require_fields(example, self.fields, where)

    def _check_line(self, text: str, where: str) -> None:
        self._parse(text, where)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._parse(*self._line(index))


def file_source(path: str | Path, field: str = "text") -> JsonlSource | TextSource:
    """Documents of a user's file: ``.jsonl`` rows' ``field``, any other file's non-blank lines."""
    return JsonlSource(path, [field]) if Path(path).suffix == ".jsonl" else TextSource(path, field)


class ParquetSource:
    """Rows of a Parquet file (read once with pyarrow; only ``fields`` columns when given)."""

    def __init__(self, path: str | Path, fields: Sequence[str] | None = None):
        import pyarrow.parquet as pq

        import pyarrow as pa

        self.path, self.fields = _existing_file(path, "Parquet"), fields
        schema = pq.read_schema(self.path)
        _check_columns({f.name: pa.types.is_string(f.type) or pa.types.is_large_string(f.type) for f in schema},
                       fields, str(self.path))
        self._table = pq.read_table(self.path, columns=list(fields) if fields else None)

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = _check_index(index, len(self), str(self.path))
        example = self._table.slice(index, 1).to_pylist()[0]
        return _require_fields(example, self.fields, f"{self.path} row {index}")


class HFDatasetSource:
    """A Hugging Face ``datasets.Dataset`` (memory-mapped Arrow, so random access is cheap)."""

    def __init__(self, dataset: Any, fields: Sequence[str] | None = None, name: str = "dataset"):
        self.dataset, self.fields, self.name = dataset, fields, name
        features = dataset.features
        _check_columns({column: getattr(features[column], "dtype", None) in ("string", "large_string")
                        for column in dataset.column_names}, fields, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = _check_index(index, len(self), self.name)
        return _require_fields(self.dataset[index], self.fields, f"{self.name} row {index}")


def hf_dataset_source(
    path: str | Path | Sequence[str | Path],
    format: str,
    split: str = "train",
    fields: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
) -> HFDatasetSource:
    """Local files through ``datasets``: ``format`` is ``"json"`` / ``"parquet"`` (``path`` = file(s)) or
    ``"disk"`` (``path`` = a directory written by ``save_to_disk``; a ``DatasetDict`` is indexed by ``split``).
    """
    import datasets

    paths = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
    name = ", ".join(paths)
    if format == "disk":
        if not Path(paths[0]).is_dir():
            raise InputNotFoundError(f"dataset directory {paths[0]} does not exist (format 'disk' reads a save_to_disk directory)")
        dataset = datasets.load_from_disk(paths[0])
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise InputError(f"{name} has splits {sorted(dataset)}, not {split!r}")
            dataset = dataset[split]
    elif format in ("json", "parquet"):
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise InputNotFoundError(f"data file(s) {missing} do not exist")
        dataset = datasets.load_dataset(
            format, data_files=paths, split=split, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    else:
        raise InputError(f"format must be 'json', 'parquet' or 'disk', got {format!r}")
    return HFDatasetSource(dataset, fields, name)


def tfds_source(
    name: str, split: str, fields: Sequence[str] | None = None, data_dir: str | None = None
) -> _DecodedSource:
    """A prepared TFDS dataset through ``tfds.data_source`` (random access; needs the seqio extra)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(f"TFDS sources need tensorflow-datasets: {SEQIO_HINT}") from None
    return _DecodedSource(tfds.data_source(name, split=split, data_dir=data_dir), fields, f"tfds {name}[{split}]")


def seqio_source(task_or_mixture: str, split: str, fields: Sequence[str] | None = None) -> _DecodedSource:
    """A registered seqio task or mixture, read once in order (no seqio shuffling: the iterator shuffles)."""
    try:
        import seqio
    except ImportError:
        raise ImportError(f"seqio sources need seqio: {SEQIO_HINT}") from None
    provider = seqio.get_mixture_or_task(task_or_mixture)
    dataset = provider.get_dataset(sequence_length=None, split=split, shuffle=False)
    return _DecodedSource(list(dataset.as_numpy_iterator()), fields, f"seqio {task_or_mixture}[{split}]")


class _DecodedSource:
    """Random-access rows of numpy/bytes values (TFDS, seqio), with bytes decoded to str."""

    def __init__(self, rows: Any, fields: Sequence[str] | None, name: str):
        self.rows, self.fields, self.name = rows, fields, name

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = _check_index(index, len(self), self.name)
        row = {key: value.decode() if isinstance(value, bytes) else value for key, value in self.rows[index].items()}
        return _require_fields(row, self.fields, f"{self.name} row {index}")


class MappedSource:
    """``fn(source[i])`` for each row: renames fields so several tasks can share one ``example_fn``."""

    def __init__(self, source: Source, fn: Callable[[dict[str, Any]], dict[str, Any]]):
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.fn(self.source[index])


class Mixture:
    """Weighted sampling across sources, deterministic in ``seed``, random access like any source.

    Item ``k`` comes from source ``s`` with probability ``weights[s] / sum(weights)``; within a source,
    picks walk a seed-determined permutation and start a new one after every full pass, so no example
    repeats before its source is used up.

    Args:
      sources: the sources to mix.
      weights: non-negative mixing rates, one per source.
      length: how many items the mixture has (one "epoch" of the iterator); default: all sources' lengths.
      seed: fixes which source each item comes from and the order inside each source.
    """

    def __init__(self, sources: Sequence[Source], weights: Sequence[float], length: int | None = None, seed: int = 0):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"need one weight per source, got {len(sources)} sources and {len(weights)} weights")
        rates = np.asarray(weights, dtype=np.float64)
        if (rates < 0).any() or rates.sum() <= 0:
            raise ValueError(f"mixture weights must be non-negative with a positive sum, got {list(weights)}")
        empty = [i for i, (source, rate) in enumerate(zip(sources, rates)) if rate > 0 and len(source) == 0]
        if empty:
            raise ValueError(f"mixture source(s) {empty} are empty but have positive weight")
        self.sources, self.seed = list(sources), seed
        length = sum(len(source) for source in sources) if length is None else length
        self._source_of_item = np.random.default_rng([seed]).choice(len(sources), size=length, p=rates / rates.sum())
        self._ordinal = np.zeros(length, dtype=np.int64)  # how many earlier items picked the same source
        for source_index in range(len(sources)):
            picks = self._source_of_item == source_index
            self._ordinal[picks] = np.arange(picks.sum())
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._source_of_item)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = _check_index(index, len(self), "mixture")
        source_index = int(self._source_of_item[index])
        source = self.sources[source_index]
        full_pass, within = divmod(int(self._ordinal[index]), len(source))
        key = (source_index, full_pass)
        if key not in self._permutations:
            if len(self._permutations) > 64:  # bound memory: items are mostly visited in order
                self._permutations.clear()
            rng = np.random.default_rng([self.seed, source_index, full_pass])
            self._permutations[key] = rng.permutation(len(source))
        return source[int(self._permutations[key][within])]


ExampleFn = Callable[[dict[str, Any], np.random.Generator], Any]


class DataIterator:
    """Batches ``[batch_size / process_count, length]`` int32 from a source, deterministic, exactly resumable.

    Pipeline: ``source[i]`` -> ``example_fn(raw, rng)`` -> first-fit packing (or one example per row) ->
    batch dict with ``llmjax.batch`` names (packed batches add segment ids and positions).

    ``example_fn`` returns one example (dict of 1-D int arrays, see objectives.py), a list of them (e.g. a
    long document cut into chunks), or None to skip the row. Its ``rng`` is seeded from
    ``(seed, epoch, source index)``, so an example is the same however the data is split or resumed.

    Each epoch visits the source in a seed-determined order (``shuffle=True``). Batches run across epoch
    boundaries; with ``num_epochs`` set, the last batch is padded with empty rows.

    Multi-process: ``batch_size`` is the *global* batch. Every process walks the same global sequence
    of batches (it depends only on the source, ``example_fn``, seed and lengths, never on the process
    layout) and returns only its contiguous block of rows ``[p * batch_size / n, (p + 1) * batch_size / n)``
    for process ``p`` of ``n`` (``llmjax.sharding.shard_batch`` puts the blocks together). So a run on
    any number of processes trains on bitwise the same global batches as one process, every process runs
    out of data at the same step, and the state is the same on every process. The price: each process
    runs ``example_fn`` over the whole global batch (tokenizing a batch is cheap next to a train step).

    Example (decoder-only causal LM)::

        it = DataIterator(JsonlSource("c.jsonl", ["text"]),
                          lambda ex, rng: causal_lm_example(tok.encode(ex["text"]), tok.eos_id),
                          batch_size=8, decoder_length=512)
    """

    def __init__(
        self,
        source: Source,
        example_fn: ExampleFn,
        *,
        batch_size: int,
        decoder_length: int,
        encoder_length: int | None = None,
        pack: bool = True,
        truncate: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.source, self.example_fn = source, example_fn
        self.batch_size, self.decoder_length, self.encoder_length = batch_size, decoder_length, encoder_length
        self.pack, self.truncate, self.seed, self.shuffle = pack, truncate, seed, shuffle
        self.num_epochs, self.process_index, self.process_count = num_epochs, process_index, process_count
        self._epoch, self._position, self._offset = 0, 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, dtype=np.int64)
        self._pending: list[dict[str, np.ndarray]] | None = None  # example_fn output of the current row
        self._examples, self._truncated = 0, {}  # this process's counts since construction (diagnostics only)
        rows_per_process = batch_size // process_count
        self._rows = slice(process_index * rows_per_process, (process_index + 1) * rows_per_process)

    def state(self) -> dict[str, int]:
        """JSON-serializable position in the global sequence: the next example not in any returned batch.

        The same on every process (nothing in it depends on the process layout).
        """
        return {
            "epoch": self._epoch,
            "position": self._position,
            "offset": self._offset,
            "seed": self.seed,
            "num_examples": len(self.source),
        }

    def stats(self) -> dict[str, float]:
        """What the loop logs beside each step: the examples batched so far by this iterator and, with
        ``truncate``, how many of them were cut to the row length per side (``truncated_<side>_examples``)."""
        return {"examples": float(self._examples),
                **{f"truncated_{side}_examples": float(count) for side, count in self._truncated.items()}}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue exactly where the iterator that produced ``state`` stopped (on any process layout)."""
        mine = self.state()
        for key in ("seed", "num_examples"):
            if key in state and state[key] != mine[key]:
                raise InputError(
                    f"iterator state has {key}={state[key]} but this iterator has {key}={mine[key]}; "
                    "restore into an iterator built with the same source and seed"
                )
        missing = [key for key in ("epoch", "position", "offset") if key not in state]
        if missing:
            raise ValueError(f"iterator state is missing {missing}; pass a dict from DataIterator.state()")
        self._epoch, self._position, self._offset = int(state["epoch"]), int(state["position"]), int(state["offset"])
        self._pending = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        packer = RowPacker(
            self.decoder_length,
            self.encoder_length,
            max_rows=self.batch_size,
            max_segments_per_row=None if self.pack else 1,
            truncate=self.truncate,
        )
        while (item := self._peek()) is not None:
            source_index, example = item
            if not packer.add(example, index=source_index):
                break  # this example starts the next batch; the state still points at it
            self._offset += 1
        if len(packer) == 0:
            raise StopIteration
        self._examples += packer.num_examples
        for side, count in packer.truncated.items():
            self._truncated[side] = self._truncated.get(side, 0) + count
        global_batch = packer.to_batch(num_rows=self.batch_size, include_segments=self.pack)
        return {name: value[self._rows] for name, value in global_batch.items()}

    def _visiting_order(self, epoch: int) -> np.ndarray:
        """Source indices for ``epoch``, in visiting order (the same on every process)."""
        if self._order_epoch != epoch:
            n = len(self.source)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def _peek(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """``(source index, example)`` at the current state without consuming it; None when data ends."""
        rows_without_examples = 0
        while True:
            if self.num_epochs is not None and self._epoch >= self.num_epochs:
                return None
            order = self._visiting_order(self._epoch)
            if self._position >= len(order):
                self._epoch, self._position, self._offset, self._pending = self._epoch + 1, 0, 0, None
                continue
            source_index = int(order[self._position])
            if self._pending is None:
                rng = np.random.default_rng([self.seed, self._epoch, source_index])
                produced = self.example_fn(self.source[source_index], rng)
                self._pending = [] if produced is None else produced if isinstance(produced, list) else [produced]
            if self._offset < len(self._pending):
                return source_index, self._pending[self._offset]
            self._position, self._offset, self._pending = self._position + 1, 0, None
            rows_without_examples += 1
            if rows_without_examples > len(order):
                raise DataError("no example in a whole epoch of the data: every document is empty or too short; "
                                "check the source (and example_fn)")
