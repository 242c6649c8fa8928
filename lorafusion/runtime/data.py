"""JSONL training data -> tokenized samples with loss labels.

Formats (one JSON object per line; other fields are ignored):

* "prompt_completion": {"prompt": str, "completion": str}; the loss is taken on the completion
  and the end-of-sequence token only.
* "text": {"text": str}; the loss is taken on the whole text and the end-of-sequence token.

A sample is [bos] + prompt + completion + [eos] (or [bos] + text + [eos]), truncated to
max_seq_len; bos is left out for tokenizers that have none.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

IGNORE_INDEX = -100  # label of a position without loss (PyTorch cross_entropy's default ignore_index)
DATA_FORMATS = ("prompt_completion", "text")
_FIELDS_OF_FORMAT = {"prompt_completion": ("prompt", "completion"), "text": ("text",)}


class Tokenizer(Protocol):
    """What data loading needs of a tokenizer (see lorafusion.runtime.tokenizer)."""

    bos_token_id: int | None
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Sample:
    """One tokenized record.

    record: 1-based line number of the record in its JSONL file.
    input_ids: [bos] + prompt + completion + [eos] (or [bos] + text + [eos]), truncated to max_seq_len.
    labels: same length as input_ids; IGNORE_INDEX (-100) where no loss is taken (bos and prompt
        tokens), else the token itself. The label at position t is the target for predicting token
        t, the Hugging Face convention: the model shifts labels by one.
    """

    record: int
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def num_target_tokens(self) -> int:
        """Positions whose label is used after the causal shift: the count of labels[1:] != -100."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


class DataError(ValueError):
    """A bad record or file: .path, .record (1-based line, or None for file-level problems), message names both."""

    def __init__(self, path: str | os.PathLike, record: int | None, reason: str) -> None:
        self.path = Path(path)
        self.record = record
        self.reason = reason
        where = f"{self.path}" if record is None else f"{self.path}, line {record}"
        super().__init__(f"{where}: {reason}")


def load_jsonl_dataset(path: str | os.PathLike, format: str, tokenizer: Tokenizer, max_seq_len: int) -> list[Sample]:
    """Read and tokenize every record of a JSONL file, in file order.

    Blank lines are skipped; record numbers are line numbers, so they still count blank lines.
    Raises DataError on an unreadable file, invalid JSON, a record that is not an object, a missing
    or non-string field, a record with no target token after truncation, or an empty dataset.
    """
    if format not in DATA_FORMATS:
        raise ValueError(f"format must be one of {', '.join(DATA_FORMATS)}, got {format!r}")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    path = Path(path)
    samples = []
    for line_number, raw_line in jsonl_lines(path):
        fields = _FIELDS_OF_FORMAT[format]
        record = parse_jsonl_record(path, line_number, raw_line, fields, f"format {format} needs")
        samples.append(_tokenize(path, line_number, record, format, tokenizer, max_seq_len))
    return samples


def jsonl_lines(path: Path):
    """(line number, raw line) of each non-blank line of a JSONL file; DataError naming the file
    when it cannot be read or holds no record."""
    try:
        content = path.read_bytes()
    except OSError as error:
        raise DataError(path, None, f"cannot read: {error.strerror or error}") from error
    found = False
    # Split bytes, not text, so an invalid UTF-8 line is reported with its number.
    for line_number, raw_line in enumerate(content.split(b"\n"), start=1):
        if line_number == 1:
            raw_line = raw_line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
        if raw_line.strip():
            found = True
            yield line_number, raw_line
    if not found:
        raise DataError(path, None, "no records (the file is empty or has only blank lines)")


def parse_jsonl_record(
    path: Path, line_number: int, raw_line: bytes, fields: tuple[str, ...], needs: str, optional: tuple[str, ...] = ()
) -> dict[str, str]:
    """The string `fields` (and those of `optional` present) of one JSONL record; DataError naming
    the file, the line and what is wrong (`needs` says who requires the fields)."""
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
        raise DataError(path, line_number, f"expected a JSON object, got {_json_type(record)}")
    for field in fields:
        if field not in record:
            expected = ", ".join(f'"{name}"' for name in fields)
            raise DataError(path, line_number, f'missing field "{field}" ({needs} {expected})')
    fields = fields + tuple(field for field in optional if field in record)
    for field in fields:
        if not isinstance(record[field], str):
            raise DataError(path, line_number, f'field "{field}" must be a string, got {_json_type(record[field])}')
        try:
            record[field].encode("utf-8")
        except UnicodeEncodeError as error:  # JSON admits escapes such as "\ud800" that are no character
            bad = record[field][error.start]
            raise DataError(path, line_number, f'field "{field}" holds a lone surrogate (\\u{ord(bad):04x}), not text') from None
    return {field: record[field] for field in fields}


def _tokenize(
    path: Path, line_number: int, record: dict[str, str], format: str, tokenizer: Tokenizer, max_seq_len: int
) -> Sample:
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if format == "prompt_completion":
        unlabelled = prefix + tokenizer.encode(record["prompt"])
        labelled = tokenizer.encode(record["completion"]) + [tokenizer.eos_token_id]
    else:
        unlabelled = prefix
        labelled = tokenizer.encode(record["text"]) + [tokenizer.eos_token_id]
    input_ids = (unlabelled + labelled)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(unlabelled) + labelled)[:max_seq_len]
    sample = Sample(record=line_number, input_ids=tuple(input_ids), labels=tuple(labels))
    if sample.num_target_tokens == 0:
        cause = f": the prompt takes {len(unlabelled)} of them" if format == "prompt_completion" else ""
        raise DataError(path, line_number, f"no target token within max_seq_len={max_seq_len}{cause}")
    return sample


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")

