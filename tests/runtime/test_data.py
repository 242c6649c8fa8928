"""lorafusion.runtime.data: JSONL records -> samples with exact loss labels; errors name the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafusion.runtime.data import IGNORE_INDEX, DataError, Sample, load_jsonl_dataset
from lorafusion.runtime.tokenizer import ByteTokenizer

BOS, EOS = ByteTokenizer.bos_token_id, ByteTokenizer.eos_token_id


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_prompt_completion_labels_mask_bos_and_prompt(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "1+2=", "completion": "3"})])
    [sample] = load_jsonl_dataset(path, "prompt_completion", ByteTokenizer(), max_seq_len=64)
    assert sample.record == 1
    assert sample.input_ids == (BOS, ord("1"), ord("+"), ord("2"), ord("="), ord("3"), EOS)
    assert sample.labels == (IGNORE_INDEX,) * 5 + (ord("3"), EOS)
    assert sample.num_target_tokens == 2


def test_text_format_labels_everything_but_bos(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "hé", "extra": 1})])
    [sample] = load_jsonl_dataset(path, "text", ByteTokenizer(), max_seq_len=64)
    body = tuple("hé".encode())
    assert sample.input_ids == (BOS, *body, EOS)
    assert sample.labels == (IGNORE_INDEX, *body, EOS)
    assert sample.num_target_tokens == len(body) + 1


def test_truncation_keeps_input_ids_and_labels_aligned(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "ab", "completion": "cdef"})])
    [sample] = load_jsonl_dataset(path, "prompt_completion", ByteTokenizer(), max_seq_len=5)
    assert sample.input_ids == (BOS, ord("a"), ord("b"), ord("c"), ord("d"))
    assert sample.labels == (IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, ord("c"), ord("d"))
    assert sample.num_target_tokens == 2 and sample.truncated
    # Filling max_seq_len exactly is no truncation.
    assert not load_jsonl_dataset(path, "prompt_completion", ByteTokenizer(), max_seq_len=8)[0].truncated


def test_num_target_tokens_ignores_position_zero() -> None:
    # Position 0 is never predicted (nothing precedes it), so its label does not count.
    assert Sample(record=1, input_ids=(5, 6, 7), labels=(5, IGNORE_INDEX, 7)).num_target_tokens == 1


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    record = json.dumps({"text": "x"})
    path = write_lines(tmp_path / "d.jsonl", ["", record, "   ", "", record, ""])
    samples = load_jsonl_dataset(path, "text", ByteTokenizer(), max_seq_len=8)
    assert [sample.record for sample in samples] == [2, 5]


def test_crlf_and_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    samples = load_jsonl_dataset(path, "text", ByteTokenizer(), max_seq_len=8)
    assert [sample.input_ids[1] for sample in samples] == [ord("a"), ord("b")]


def test_tokenizer_without_bos(tmp_path: Path) -> None:
    class NoBosTokenizer(ByteTokenizer):
        bos_token_id = None

    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "a", "completion": "b"})])
    [sample] = load_jsonl_dataset(path, "prompt_completion", NoBosTokenizer(), max_seq_len=8)
    assert sample.input_ids == (ord("a"), ord("b"), EOS)
    assert sample.labels == (IGNORE_INDEX, ord("b"), EOS)


GOOD = json.dumps({"prompt": "p", "completion": "c"})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "p", "completion": ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got an array"),
        ('"just a string"', "expected a JSON object, got a string"),
        ('{"prompt": "p"}', 'missing field "completion"'),
        ('{"completion": "c"}', 'missing field "prompt"'),
        ('{"prompt": 3, "completion": "c"}', 'field "prompt" must be a string, got a number'),
        ('{"prompt": "p", "completion": null}', 'field "completion" must be a string, got null'),
        ('{"prompt": "' + "p" * 20 + '", "completion": "c"}', "no target token within max_seq_len=16"),
    ],
)
def test_bad_record_is_named_by_line_number(tmp_path: Path, bad_line: str, message: str) -> None:
    path = write_lines(tmp_path / "d.jsonl", [GOOD, "", bad_line, GOOD])
    with pytest.raises(DataError) as caught:
        load_jsonl_dataset(path, "prompt_completion", ByteTokenizer(), max_seq_len=16)
    error = caught.value
    assert (error.path, error.record) == (path, 3)
    assert message in str(error)
    assert str(error).startswith(f"{path}, line 3: ")


def test_invalid_utf8_is_named_by_line_number(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match="line 2: not valid UTF-8") as caught:
        load_jsonl_dataset(path, "text", ByteTokenizer(), max_seq_len=8)
    assert caught.value.record == 2


def test_text_record_without_room_for_a_target(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "abc"})])
    with pytest.raises(DataError, match="line 1: no target token within max_seq_len=1"):
        load_jsonl_dataset(path, "text", ByteTokenizer(), max_seq_len=1)


def test_text_format_needs_the_text_field(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(DataError, match='line 1: missing field "text"'):
        load_jsonl_dataset(path, "text", ByteTokenizer(), max_seq_len=8)


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_empty_dataset(tmp_path: Path, lines: list[str]) -> None:
    path = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match="no records") as caught:
        load_jsonl_dataset(path, "text", ByteTokenizer(), max_seq_len=8)
    assert caught.value.record is None and caught.value.path == path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent.jsonl: cannot read") as caught:
        load_jsonl_dataset(tmp_path / "absent.jsonl", "text", ByteTokenizer(), max_seq_len=8)
    assert caught.value.record is None


def test_bad_arguments(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(ValueError, match="format"):
        load_jsonl_dataset(path, "chat", ByteTokenizer(), max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        load_jsonl_dataset(path, "text", ByteTokenizer(), max_seq_len=0)


def test_shipped_example_data_loads() -> None:
    data_dir = Path(__file__).resolve().parents[2] / "examples" / "data"
    for name in ("addition", "reverse", "uppercase"):
        samples = load_jsonl_dataset(data_dir / f"{name}.jsonl", "prompt_completion", ByteTokenizer(), max_seq_len=64)
        assert len(samples) >= 200
        assert max(len(sample.input_ids) for sample in samples) < 40
        assert all(sample.input_ids[-1] == EOS for sample in samples)  # nothing truncated
