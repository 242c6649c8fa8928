"""Training data -> tokenized samples with loss labels.

Formats (one record per JSONL line or table row; other fields are ignored; `columns` in a job's
config maps these field names to the dataset's own):

* "prompt_completion": {"prompt": str, "completion": str}; the loss is taken on the completion
  and the end-of-sequence token only.
* "text": {"text": str}; the loss is taken on the whole text and the end-of-sequence token.
* "messages": {"messages": [{"role", "content"}, ...]} (optionally "tools"), rendered by the
  tokenizer's chat template; the loss is taken on the assistant turns only (see chat.py).

A prompt_completion or text sample is [bos] + prompt + completion + [eos] (or [bos] + text + [eos]),
truncated to max_seq_len; bos is left out for tokenizers that have none. Where records come from
(JSONL, Parquet, a datasets.save_to_disk directory) is data_sources.py's business.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

IGNORE_INDEX = -100  # label of a position without loss (PyTorch cross_entropy's default ignore_index)
# Each format's fields (the ones a job's `columns` may rename), and the optional ones it reads when present.
FIELDS_OF_FORMAT = {"prompt_completion": ("prompt", "completion"), "text": ("text",), "messages": ("messages",)}
OPTIONAL_FIELDS_OF_FORMAT = {"prompt_completion": (), "text": (), "messages": ("tools",)}
DATA_FORMATS = tuple(FIELDS_OF_FORMAT)

# How a data file is opened for reading (binary). The service's opens each file only where it lies
# under its data roots (lorafusion.service.data_access); anything else reads it plainly.
Opener = Callable[[Path], BinaryIO]


def open_binary(path: Path) -> BinaryIO:
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


class Tokenizer(Protocol):
    """What data loading needs of a tokenizer (see lorafusion.runtime.tokenizer)."""

    bos_token_id: int | None
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Sample:
    """One tokenized record.

    record: the record's 1-based line in its JSONL file, or its 0-based row index in a table.
    input_ids: [bos] + prompt + completion + [eos] (or [bos] + text + [eos]), truncated to max_seq_len.
    labels: same length as input_ids; IGNORE_INDEX (-100) where no loss is taken (bos and prompt
        tokens), else the token itself. The label at position t is the target for predicting token
        t, the Hugging Face convention: the model shifts labels by one.
    """

    record: int
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool = False  # cut by max_seq_len (its end never trained on)

    @property
    def num_target_tokens(self) -> int:
        """Positions whose label is used after the causal shift: the count of labels[1:] != -100."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


class DataError(ValueError):
    """A bad record or file: .path, .record (1-based line of a JSONL file, or 0-based row index of a
    table, or None for file-level problems), .unit ("line" or "row"); the message names them."""

    def __init__(self, path: str | os.PathLike, record: int | None, reason: str, unit: str = "line") -> None:
        self.path = Path(path)
        self.record = record
        self.unit = unit
        self.reason = reason
        where = f"{self.path}" if record is None else f"{self.path}, {unit} {record}"
        super().__init__(f"{where}: {reason}")


def load_samples(
    path: str | os.PathLike, format: str, tokenizer: Tokenizer, max_seq_len: int, columns: dict[str, str] | None = None,
    opener: Opener = open_binary,
) -> list[Sample]:
    """Read and tokenize every record of a dataset (a JSONL or Parquet file, a directory of Parquet
    files or one written by datasets' save_to_disk; see data_sources.py), in order.

    `columns` maps the format's field names to the dataset's (e.g. {"prompt": "question"}); every
    file is opened with `opener`.
    Raises DataError naming the file and the line (or row) on a bad record, a record with no target
    token after truncation, an unreadable or empty dataset.
    """
    if format not in DATA_FORMATS:
        raise ValueError(f"format must be one of {', '.join(DATA_FORMATS)}, got {format!r}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    from .data_sources import read_records  # data_sources builds on this module

    if format == "messages":
        from .chat import ChatRenderer

        renderer = ChatRenderer.of(tokenizer, Path(path))
        return [renderer.sample(record, max_seq_len) for record in read_records(path, format, columns, opener)]
    return [_tokenize(record, format, tokenizer, max_seq_len) for record in read_records(path, format, columns, opener)]


def load_jsonl_dataset(path: str | os.PathLike, format: str, tokenizer: Tokenizer, max_seq_len: int) -> list[Sample]:
    """load_samples of a JSONL file with the format's own field names (blank lines are skipped;
    record numbers are line numbers, so they still count blank lines)."""
    return load_samples(path, format, tokenizer, max_seq_len)


@dataclass(frozen=True)
class Record:
    """One record of a dataset, its fields under the format's names (whatever `columns` mapped).

    number: the 1-based line of a JSONL file, or the 0-based row index of a table (as dataset[i]).
    """

    path: Path
    number: int
    unit: str  # "line" | "row"
    fields: dict[str, Any]

    def error(self, reason: str) -> DataError:
        return DataError(self.path, self.number, reason, self.unit)


def jsonl_lines(path: Path, opener: Opener = open_binary):
    """(line number, raw line) of each non-blank line of a JSONL file, read a line at a time (a large
    file is never held whole); DataError naming the file when it cannot be read or holds no record."""
    try:
        file = opener(path)  # closed below, after the last line is yielded
    except OSError as error:
        raise DataError(path, None, f"cannot read: {error.strerror or error}") from error
    found = False
    with file:
        # Bytes, not text, so an invalid UTF-8 line is reported with its number; binary files split at b"\n" only.
        try:
            for line_number, raw_line in enumerate(file, start=1):
                if line_number == 1:
                    raw_line = raw_line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
                if raw_line.strip():
                    found = True
                    yield line_number, raw_line
        except OSError as error:  # a directory, or a read failing midway
            raise DataError(path, None, f"cannot read: {error.strerror or error}") from error
    if not found:
        raise DataError(path, None, "no records (the file is empty or has only blank lines)")


def parse_jsonl_record(
    path: Path, line_number: int, raw_line: bytes, fields: tuple[str, ...], needs: str, optional: tuple[str, ...] = ()
) -> dict[str, str]:
    """The string `fields` (and those of `optional` present) of one JSONL record; DataError naming
    the file, the line and what is wrong (`needs` says who requires the fields)."""
    record = parse_json_object(path, line_number, raw_line)
    fail = lambda reason: DataError(path, line_number, reason)  # noqa: E731
    return check_fields(record, fields, optional, needs, fail, kinds={field: str for field in fields + optional})


def parse_json_object(path: Path, line_number: int, raw_line: bytes) -> dict:
    """One JSONL line as a JSON object; DataError naming the file and line otherwise."""
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(path, line_number, f"not valid UTF-8 at byte {error.start}") from error
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(path, line_number, f"invalid JSON: {error.msg} (column {error.colno})") from error
    except RecursionError:
        raise DataError(path, line_number, "invalid JSON: nested too deeply") from None
    if not isinstance(record, dict):
        raise DataError(path, line_number, f"expected a JSON object, got {json_type(record)}")
    return record


def check_fields(
    record: dict, fields: tuple[str, ...], optional: tuple[str, ...], needs: str, fail, kinds: dict[str, type]
) -> dict:
    """`fields` (and those of `optional` present) of `record`, each checked to be of its
    kind (str or list); `fail(reason)` builds the DataError that names the record."""
    for field in fields:
        if field not in record:
            expected = ", ".join(f'"{name}"' for name in fields)
            raise fail(f'missing field "{field}" ({needs} {expected})')
    present = fields + tuple(field for field in optional if field in record)
    for field in present:
        value, kind = record[field], kinds[field]
        if not isinstance(value, kind):
            raise fail(f'field "{field}" must be {"a string" if kind is str else "an array"}, got {json_type(value)}')
        if kind is str:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:  # JSON admits escapes such as "\ud800" that are no character
                raise fail(f'field "{field}" holds a lone surrogate (\\u{ord(value[error.start]):04x}), not text') from None
    return {field: record[field] for field in present}


def _tokenize(record: Record, format: str, tokenizer: Tokenizer, max_seq_len: int) -> Sample:
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if format == "prompt_completion":
        unlabelled = prefix + tokenizer.encode(record.fields["prompt"])
        labelled = tokenizer.encode(record.fields["completion"]) + [tokenizer.eos_token_id]
    else:
        unlabelled = prefix
        labelled = tokenizer.encode(record.fields["text"]) + [tokenizer.eos_token_id]
    input_ids = (unlabelled + labelled)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(unlabelled) + labelled)[:max_seq_len]
    truncated = len(unlabelled) + len(labelled) > max_seq_len
    sample = Sample(record=record.number, input_ids=tuple(input_ids), labels=tuple(labels), truncated=truncated)
    if sample.num_target_tokens == 0:
        cause = f": the prompt takes {len(unlabelled)} of them" if format == "prompt_completion" else ""
        raise record.error(f"no target token within max_seq_len={max_seq_len}{cause}")
    return sample


def json_type(value: object) -> str:
    """What a value is, in JSON's words; a table's other kinds (binary, dates) by what they are."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null", bytes: "binary data"}
    if type(value) in names:
        return names[type(value)]
    return "a number" if isinstance(value, numbers.Number) else f"a {type(value).__name__} value"
