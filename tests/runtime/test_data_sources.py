"""Datasets on disk: Parquet files (one, or a directory of them) and datasets' save_to_disk
directories give exactly the samples of the equivalent JSONL, under the user's column names; bad
rows are named with their file and row index; the `data` extra is named when it is missing; a
large JSONL is read a line at a time."""

from __future__ import annotations

import hashlib
import json
import sys
import tracemalloc
from pathlib import Path

import pytest

from lorafusion.runtime.data import DataError, load_samples
from lorafusion.runtime.data_sources import data_digest, read_records
from lorafusion.runtime.tokenizer import ByteTokenizer

import datasets  # the `data` extra, part of `dev`: missing, these tests fail rather than skip

RECORDS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in ((3, 4), (10, 25), (7, 7), (40, 2), (1, 99))]
COLUMNS = {"prompt": "question", "completion": "answer"}


def renamed(records: list[dict]) -> list[dict]:
    return [{"question": r["prompt"], "answer": r["completion"], "id": i} for i, r in enumerate(records)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    datasets.Dataset.from_list(records).to_parquet(str(path))
    return path


def save_to_disk(path: Path, records: list[dict]) -> Path:
    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


def load(path: Path, columns=COLUMNS, format="prompt_completion", max_seq_len=32):
    return load_samples(path, format, ByteTokenizer(), max_seq_len, columns)


def test_parquet_and_save_to_disk_give_the_jsonl_samples(tmp_path: Path) -> None:
    expected = load_samples(write_jsonl(tmp_path / "d.jsonl", RECORDS), "prompt_completion", ByteTokenizer(), 32)
    for path in (write_parquet(tmp_path / "d.parquet", renamed(RECORDS)), save_to_disk(tmp_path / "saved", renamed(RECORDS))):
        samples = load(path)
        assert [(s.input_ids, s.labels) for s in samples] == [(s.input_ids, s.labels) for s in expected]
        assert [s.record for s in samples] == [0, 1, 2, 3, 4]  # row indices, as dataset[i]


def test_a_directory_of_parquet_files_is_read_in_name_order(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_parquet(shards / "train-00001.parquet", renamed(RECORDS[3:]))
    write_parquet(shards / "train-00000.parquet", renamed(RECORDS[:3]))
    expected = load(write_parquet(tmp_path / "whole.parquet", renamed(RECORDS)))
    assert [s.input_ids for s in load(shards)] == [s.input_ids for s in expected]


def test_batches_of_rows_keep_their_row_indices(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("lorafusion.runtime.data_sources.BATCH_ROWS", 2)
    records = renamed(RECORDS)
    records[3]["question"] = None
    for path in (write_parquet(tmp_path / "d.parquet", records), save_to_disk(tmp_path / "saved", records)):
        with pytest.raises(DataError) as caught:
            load(path)
        assert str(caught.value) == f'{path}, row 3: field "question" must be a string, got null'
        assert (caught.value.record, caught.value.unit) == (3, "row")


def test_a_bad_row_of_a_shard_names_the_shard(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_parquet(shards / "a.parquet", renamed(RECORDS[:2]))
    bad = renamed(RECORDS[2:])
    bad[1]["answer"] = "x" * 40  # leaves no room for a target within max_seq_len
    bad[1]["question"] = "q" * 40
    write_parquet(shards / "b.parquet", bad)
    with pytest.raises(DataError, match=r"b\.parquet, row 1: no target token within max_seq_len=32"):
        load(shards)


def test_missing_column_names_the_file_and_the_columns_it_has(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", renamed(RECORDS))
    with pytest.raises(DataError) as caught:
        load(path, columns=None)
    assert str(caught.value) == (
        f'{path}: no column "prompt" (format prompt_completion needs "prompt", "completion"; it has question, answer, id); '
        "map yours with the job's columns key"
    )


def test_jsonl_fields_are_mapped_too(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", renamed(RECORDS))
    assert len(load(path)) == 5
    write_jsonl(path, [{"question": "1+1="}])
    with pytest.raises(DataError, match=r'd\.jsonl, line 1: missing field "answer" \(format prompt_completion needs "question", "answer"\)'):
        load(path)


def test_dataset_directories_that_are_not_one_dataset(tmp_path: Path) -> None:
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS), "test": datasets.Dataset.from_list(RECORDS)})
    splits.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"dict: holds a DatasetDict \(splits: test, train\); give one split's directory, e\.g\. .*dict/test$"):
        load(tmp_path / "dict", columns=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: not a dataset directory: no state\.json"):
        load(tmp_path / "empty")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file"):
        load(tmp_path / "broken.parquet")
    datasets.Dataset.from_list([{"question": "a", "answer": "b"}]).select([]).to_parquet(str(tmp_path / "none.parquet"))
    with pytest.raises(DataError, match=r"none\.parquet: no records \(no rows\)"):
        load(tmp_path / "none.parquet")


@pytest.mark.parametrize("what", ["Parquet", "a save_to_disk directory"])
def test_missing_data_extra_is_named(tmp_path: Path, monkeypatch, what: str) -> None:
    # A save_to_disk directory's Arrow files are read with pyarrow alone (datasets is not needed).
    hidden = "pyarrow"
    path = write_parquet(tmp_path / "d.parquet", renamed(RECORDS)) if what == "Parquet" else save_to_disk(tmp_path / "saved", renamed(RECORDS))
    for name in list(sys.modules):
        if name.split(".")[0] == hidden:
            monkeypatch.setitem(sys.modules, name, None)  # `import` then raises ImportError
    monkeypatch.setitem(sys.modules, hidden, None)
    with pytest.raises(DataError) as caught:
        load(path)
    assert str(caught.value) == f"{path}: reading {what} needs the data extra (datasets, pyarrow): pip install 'lorafusion[data]'"


def test_a_large_jsonl_is_read_a_line_at_a_time(tmp_path: Path) -> None:
    # 1000 records of 10 kB (10 MB) cut to 8 tokens each: reading the file whole would take 10 MB.
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": chr(97 + i % 26) * 10_000} for i in range(1000)])
    tracemalloc.start()
    try:
        samples = load_samples(path, "text", ByteTokenizer(), max_seq_len=8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(samples) == 1000 and samples[1].input_ids[1] == ord("b")
    assert peak < 2_000_000, peak


def test_data_digest(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    assert data_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:16]  # what earlier runs recorded
    saved = save_to_disk(tmp_path / "saved", renamed(RECORDS))
    before = data_digest(saved)
    save_to_disk(tmp_path / "other", renamed(RECORDS[::-1]))
    assert data_digest(tmp_path / "other") != before and data_digest(saved) == before


def test_columns_datasets_stores_as_json_text_are_read_as_the_jsonl_objects(tmp_path: Path) -> None:
    # Values of mixed types (a message's content a string or a list of parts, tools of any JSON
    # schema) are stored by datasets as JSON text (its Json feature) and decoded when it reads them.
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
    records = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}], "tools": tools},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "hello"}], "tools": []},
    ]
    dataset = datasets.Dataset.from_list(records, on_mixed_types="use_json")
    dataset.save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    expected = [r.fields for r in read_records(write_jsonl(tmp_path / "d.jsonl", records), "messages")]
    assert expected[1]["messages"][0]["content"] == [{"type": "text", "text": "hi"}]
    for path in (tmp_path / "saved", tmp_path / "d.parquet"):
        assert [r.fields for r in read_records(path, "messages")] == expected, path


def test_an_empty_save_to_disk_dataset_has_no_records(tmp_path: Path) -> None:
    datasets.Dataset.from_list(renamed(RECORDS)).select([]).save_to_disk(str(tmp_path / "empty"))  # no Arrow file at all
    with pytest.raises(DataError) as caught:
        load(tmp_path / "empty")
    assert str(caught.value) == f"{tmp_path / 'empty'}: no records (no rows)"


def test_json_text_that_does_not_parse_names_its_row(tmp_path: Path) -> None:
    import pyarrow
    import pyarrow.parquet

    texts = pyarrow.array(['{"type": "function"}', "{not json"], type=pyarrow.string())
    tools = pyarrow.ListArray.from_arrays([0, 1, 2], pyarrow.ExtensionArray.from_storage(pyarrow.json_(), texts))
    messages = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]] * 2
    pyarrow.parquet.write_table(pyarrow.table({"messages": messages, "tools": tools}), tmp_path / "d.parquet")
    with pytest.raises(DataError) as caught:
        list(read_records(tmp_path / "d.parquet", "messages"))
    assert str(caught.value).startswith(f'{tmp_path / "d.parquet"}, row 1: field "tools" holds JSON text that does not parse (')
