"""A job's data is read only from under the server's data roots at the moment it is read, not
only when its path is checked: a file, or a directory above it, swapped for a link out of the
roots between the check and the read is refused (lorafusion.service.data_access)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lorafusion.runtime.data import DataError
from lorafusion.service.client import ServiceError
from lorafusion.service.data_access import RootedOpener
from service_fixtures import RunningService, job_entry, server_dict

SECRET = '{"prompt": "secret", "completion": "never read"}\n'


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """data/ (the root) holding sub/add.jsonl and a link to it; outside/ holding a secret of the
    same name."""
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "sub" / "add.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    (tmp_path / "data" / "link.jsonl").symlink_to(tmp_path / "data" / "sub" / "add.jsonl")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "add.jsonl").write_text(SECRET)
    return tmp_path


def swap_for_link(path: Path, target: Path) -> None:
    """What a submitter who can write under a root does between the check and the read."""
    path.rename(path.with_name(path.name + ".moved"))
    path.symlink_to(target)


def test_files_under_the_roots_are_read_links_inside_them_too(tree: Path) -> None:
    opener = RootedOpener(((tree / "data").resolve(),))
    for path in (tree / "data" / "sub" / "add.jsonl", tree / "data" / "link.jsonl"):
        with opener(path) as handle:
            assert b"1+1=" in handle.read()
    with pytest.raises(DataError, match="outside the server's data_roots"):
        opener(tree / "outside" / "add.jsonl")


@pytest.mark.parametrize("swapped", ["the file", "a directory above it"])
def test_a_link_swapped_in_after_the_path_is_resolved_is_refused_at_the_open(tree: Path, monkeypatch, swapped: str) -> None:
    """The swap right between the opener's own resolution and its open (the narrowest gap there is):
    O_NOFOLLOW refuses a link as the file itself, the opened file's path one above it."""
    root = (tree / "data").resolve()
    opener = RootedOpener((root,))
    real_open = os.open

    def swapping_open(path, flags, *args):
        if swapped == "the file":
            swap_for_link(root / "sub" / "add.jsonl", tree / "outside" / "add.jsonl")
        else:
            swap_for_link(root / "sub", tree / "outside")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(DataError) as refused:
        opener(tree / "data" / "sub" / "add.jsonl")
    assert str(refused.value) == (
        f"{tree / 'data' / 'sub' / 'add.jsonl'}: resolves to {(tree / 'outside' / 'add.jsonl').resolve()} when read, "
        f"outside the server's data_roots ({root}); it was changed after it was checked"
    )


def test_only_regular_files_are_read(tree: Path) -> None:
    os.mkfifo(tree / "data" / "fifo.jsonl")  # opening it to read would wait for a writer for ever
    with pytest.raises(DataError, match=r"fifo\.jsonl: not a regular file"):
        RootedOpener(((tree / "data").resolve(),))(tree / "data" / "fifo.jsonl")


@pytest.mark.parametrize("dataset", ["jsonl", "parquet directory", "eval_data"])
def test_a_submission_whose_data_is_swapped_for_a_link_after_its_check_is_refused(tmp_path, monkeypatch, dataset) -> None:
    """The service checks a submitted job's paths, then parses the job, then reads its data: the
    data swapped for a link out of the roots in between (here: while the job is parsed) is refused
    with the named problem, and nothing is accepted."""
    import lorafusion.service.trainer as service_trainer

    entry = job_entry(tmp_path, "add")
    outside = tmp_path / "outside"
    outside.mkdir()
    if dataset in ("jsonl", "eval_data"):
        data = Path(entry["data"])
        if dataset == "eval_data":
            data = data.with_name("held_out.jsonl")
            shutil.copy(entry["data"], data)
            entry = {**entry, "eval_data": str(data), "eval_every": 1}
        shutil.copy(data, outside / data.name)
        swapped, target = data, outside / data.name
    else:
        import datasets

        records = [json.loads(line) for line in Path(entry["data"]).read_text().splitlines()]
        data = tmp_path / "data" / "add_parquet"
        data.mkdir()
        datasets.Dataset.from_list(records).to_parquet(str(data / "part-0.parquet"))
        shutil.copy(data / "part-0.parquet", outside / "secret.parquet")
        swapped, target = data / "part-0.parquet", outside / "secret.parquet"
        entry = {**entry, "data": str(data)}
    parse_job = service_trainer.parse_job

    def parse_then_swap(entry, server):
        spec = parse_job(entry, server)
        swap_for_link(swapped, target)
        return spec

    monkeypatch.setattr(service_trainer, "parse_job", parse_then_swap)
    with RunningService(server_dict(tmp_path), tmp_path) as service:
        with pytest.raises(ServiceError) as refused:
            service.client.submit(entry)
        assert refused.value.problems == [{
            "key": "eval_data" if dataset == "eval_data" else "data",
            "reason": f"{swapped}: resolves to {target.resolve()} when read, outside the server's data_roots "
                      f"({(tmp_path / 'data').resolve()}); it was changed after it was checked",
        }], refused.value.problems
        assert service.client.jobs() == []
