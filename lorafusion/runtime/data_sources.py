"""Where a job's records come from, and under which names.

A job's `data` (and `eval_data`) is one of:

* a JSONL file (any name not ending in .parquet), read a line at a time;
* a Parquet file (*.parquet), or a directory of them (read in name order), read in batches of rows;
* a directory written by `datasets.Dataset.save_to_disk` (it holds state.json): the Arrow files
  state.json lists, read in batches of rows.

Every file is opened through an `opener` (the service's opens only files under its data roots).
Parquet and save_to_disk need the `data` extra (pyarrow; datasets writes save_to_disk
directories), imported only when such a dataset is read. JSON text stored as Arrow's arrow.json
type (datasets' Json feature) is read as the objects it holds, as datasets reads it. Records are
yielded one at a time and tokenized as they come, so a dataset is never held in Python objects
twice: a 1 GB JSONL is read once, and what stays is its samples.

`columns` maps a format's field names to the dataset's own (`{"prompt": "question"}`); a record's
fields reach the tokenizer under the format's names, and errors name the dataset's.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .data import (
    FIELDS_OF_FORMAT,
    OPTIONAL_FIELDS_OF_FORMAT,
    DataError,
    Opener,
    Record,
    check_fields,
    jsonl_lines,
    open_binary,
    parse_json_object,
)

BATCH_ROWS = 1024  # rows converted to Python objects at a time
DATA_EXTRA_HINT = "pip install 'lorafusion[data]'"
SAVE_TO_DISK_MARKER = "state.json"  # what datasets' save_to_disk writes beside a Dataset's Arrow files
DATASET_DICT_MARKER = "dataset_dict.json"  # ... and beside a DatasetDict's split directories
_LIST_FIELDS = ("messages", "tools")  # the other fields are strings


def read_records(
    path: str | os.PathLike, format: str, columns: Mapping[str, str] | None = None, opener: Opener = open_binary
) -> Iterator[Record]:
    """Each record of the dataset at `path`, in order, with the fields of `format` (see data.py)
    checked and named as the format names them. DataError naming the file and the line (JSONL)
    or row index (tables) of a bad record, or the file that cannot be read or holds no record.
    Every file is opened with `opener`."""
    path = Path(path)
    fields = _Fields(format, columns or {})
    if path.is_dir():
        if (path / SAVE_TO_DISK_MARKER).is_file():
            yield from _read_saved_dataset(path, fields, opener)
        elif (path / DATASET_DICT_MARKER).is_file():
            splits = sorted(child.name for child in path.iterdir() if (child / SAVE_TO_DISK_MARKER).is_file())
            raise DataError(path, None, f"holds a DatasetDict (splits: {', '.join(splits)}); give one split's directory, e.g. {path / (splits or ['train'])[0]}")
        elif parquet_files := sorted(path.glob("*.parquet")):
            yield from _read_parquet(path, parquet_files, fields, opener)
        else:
            raise DataError(path, None, f"not a dataset directory: no {SAVE_TO_DISK_MARKER} (datasets' save_to_disk) and no *.parquet files")
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, [path], fields, opener)
    else:
        yield from _read_jsonl(path, fields, opener)


class _Fields:
    """A format's fields under the dataset's column names, and the checks of a record's values."""

    def __init__(self, format: str, columns: Mapping[str, str]) -> None:
        self.required = tuple(columns.get(f, f) for f in FIELDS_OF_FORMAT[format])
        self.optional = tuple(columns.get(f, f) for f in OPTIONAL_FIELDS_OF_FORMAT[format])
        self.format_name = {columns.get(f, f): f for f in FIELDS_OF_FORMAT[format] + OPTIONAL_FIELDS_OF_FORMAT[format]}
        self.kinds = {column: list if name in _LIST_FIELDS else str for column, name in self.format_name.items()}
        self.needs = f"format {format} needs"

    def record(self, path: Path, number: int, unit: str, values: dict) -> Record:
        fail = lambda reason: DataError(path, number, reason, unit)  # noqa: E731
        # A null optional field (a conversation without tools: a table has the column in every row,
        # and datasets' to_json writes it as null) is an absent one.
        values = {column: value for column, value in values.items() if value is not None or column not in self.optional}
        checked = check_fields(values, self.required, self.optional, self.needs, fail, self.kinds)
        return Record(path, number, unit, {self.format_name[column]: value for column, value in checked.items()})

    def check_columns(self, path: Path, names: list[str]) -> list[str]:
        """The dataset's columns to read; DataError naming a required one it lacks."""
        for column in self.required:
            if column not in names:
                expected = ", ".join(f'"{name}"' for name in self.required)
                raise DataError(
                    path, None, f'no column "{column}" ({self.needs} {expected}; it has {", ".join(names) or "none"}); '
                    "map yours with the job's columns key"
                )
        return [column for column in self.required + self.optional if column in names]


def _read_jsonl(path: Path, fields: _Fields, opener: Opener) -> Iterator[Record]:
    for number, raw_line in jsonl_lines(path, opener):
        yield fields.record(path, number, "line", parse_json_object(path, number, raw_line))


def _read_parquet(path: Path, files: list[Path], fields: _Fields, opener: Opener) -> Iterator[Record]:
    pyarrow = _import_data_extra("pyarrow", path, "Parquet")
    parquet = _import_data_extra("pyarrow.parquet", path, "Parquet")
    rows = 0
    for file in files:
        with _opened(file, opener) as handle:
            try:
                table = parquet.ParquetFile(handle)
                names = table.schema_arrow.names
            except (OSError, pyarrow.ArrowException) as error:
                raise DataError(file, None, f"not a readable Parquet file ({error})") from None
            wanted = fields.check_columns(file, names)
            decoders = _json_decoders(table.schema_arrow, wanted, pyarrow)
            batches = table.iter_batches(batch_size=BATCH_ROWS, columns=wanted)
            for first_row, batch in _numbered(batches, file, pyarrow):
                yield from _rows(file, first_row, batch.to_pydict(), fields, decoders)
                rows += batch.num_rows
    if rows == 0:
        raise DataError(path, None, "no records (no rows)")


def _read_saved_dataset(path: Path, fields: _Fields, opener: Opener) -> Iterator[Record]:
    """The rows of the Arrow files state.json lists, in order: what datasets.load_from_disk
    concatenates (Arrow IPC streams; save_to_disk writes no indices mapping), read through `opener`
    file by file rather than memory-mapped by datasets, which would open the files itself."""
    pyarrow = _import_data_extra("pyarrow", path, "a save_to_disk directory")
    ipc = _import_data_extra("pyarrow.ipc", path, "a save_to_disk directory")
    try:
        with _opened(path / SAVE_TO_DISK_MARKER, opener) as handle:
            names = [entry["filename"] for entry in json.load(handle)["_data_files"]]
        if not all(isinstance(name, str) for name in names):  # (none: an empty dataset)
            raise ValueError("Arrow file names must be strings")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(path, None, f"cannot load this save_to_disk directory ({SAVE_TO_DISK_MARKER}: {error!r})") from None
    rows = 0
    for name in names:
        file = path / name
        with _opened(file, opener) as handle:
            try:
                stream = ipc.open_stream(handle)
            except (OSError, pyarrow.ArrowException) as error:
                raise DataError(file, None, f"not a readable Arrow file ({error})") from None
            wanted = fields.check_columns(path, stream.schema.names)
            decoders = _json_decoders(stream.schema, wanted, pyarrow)
            for _, batch in _numbered(stream, file, pyarrow):
                yield from _rows(path, rows, {column: batch.column(column).to_pylist() for column in wanted}, fields, decoders)
                rows += batch.num_rows
    if rows == 0:
        raise DataError(path, None, "no records (no rows)")


def _json_decoders(schema, columns: list[str], pyarrow) -> dict[str, Callable[[Any], Any]]:
    """For each of `columns` holding JSON text anywhere in its type (Arrow's arrow.json type, which
    datasets' Json feature stores values of mixed types as: a message's content that is a string
    here and a list of parts there, tools of any schema), what turns a value of it into the objects
    the text holds, as datasets decodes them when it reads the column."""
    decoders = {column: _json_decoder(schema.field(column).type, pyarrow) for column in columns}
    return {column: decode for column, decode in decoders.items() if decode is not None}


def _json_decoder(arrow_type, pyarrow) -> Callable[[Any], Any] | None:
    """What parses the JSON text in a to_pylist value of `arrow_type`, or None if it holds none."""
    if getattr(arrow_type, "extension_name", None) == "arrow.json":
        return lambda value: None if value is None else json.loads(value)
    types = pyarrow.types
    if types.is_list(arrow_type) or types.is_large_list(arrow_type) or types.is_fixed_size_list(arrow_type):
        item = _json_decoder(arrow_type.value_type, pyarrow)
        return None if item is None else lambda value: None if value is None else [item(v) for v in value]
    if types.is_struct(arrow_type):
        members = [(f.name, _json_decoder(f.type, pyarrow)) for f in arrow_type]
        members = [(name, decode) for name, decode in members if decode is not None]
        if not members:
            return None
        return lambda value: None if value is None else {**value, **{name: decode(value[name]) for name, decode in members}}
    return None


def _opened(file: Path, opener: Opener):
    """`opener(file)`, a file that cannot be opened named as DataError."""
    try:
        return opener(file)
    except OSError as error:
        raise DataError(file, None, f"cannot read: {error.strerror or error}") from None


def _numbered(batches, file: Path, pyarrow):
    """(index of the batch's first row, batch); a file damaged midway is named, not a traceback."""
    first_row = 0
    try:
        for batch in batches:
            yield first_row, batch
            first_row += batch.num_rows
    except (OSError, pyarrow.ArrowException) as error:
        raise DataError(file, None, f"cannot read row {first_row} onwards ({error})") from None


def _rows(
    path: Path, first_row: int, batch: dict[str, list], fields: _Fields, decoders: Mapping[str, Callable[[Any], Any]]
) -> Iterator[Record]:
    columns = list(batch)
    for offset, values in enumerate(zip(*batch.values())):
        row, number = dict(zip(columns, values)), first_row + offset
        for column, decode in decoders.items():
            try:
                row[column] = decode(row[column])
            except ValueError as error:
                raise DataError(path, number, f'field "{column}" holds JSON text that does not parse ({error})', "row") from None
        yield fields.record(path, number, "row", row)


def _import_data_extra(module: str, path: Path, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(path, None, f"reading {what} needs the data extra (datasets, pyarrow): {DATA_EXTRA_HINT}") from None


def data_digest(path: str | os.PathLike, opener: Opener = open_binary) -> str:
    """A short hash of a dataset's bytes (a file, or every file under a directory, with its name),
    read in chunks (each file opened with `opener`): what a resumed run checks its data against."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with opener(file) as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]
