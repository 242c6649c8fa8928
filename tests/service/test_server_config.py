"""SERVER.yaml's own keys are declared (lorafusion.service.config.ServerKeys) beside the training
sections: every problem of both at once, one line each with its key, the token never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafusion.runtime.config import ConfigError
from lorafusion.service.config import parse_server_config
from service_fixtures import server_dict

SECRET = "not-long-enough"


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        ({"port": 70000}, "port", "must be <= 65535, got 70000"),
        ({"port": "8631"}, "port", "must be an integer, got '8631' (str)"),
        ({"window_batches": 0}, "window_batches", "must be >= 1, got 0"),
        ({"admission": "sjf"}, "admission", "must be one of size_aware, all_live; got 'sjf' (str)"),
        ({"max_wait_windows": 0}, "max_wait_windows", "must be >= 1, got 0"),
        ({"data_roots": "data"}, "data_roots", "must be a list, got 'data' (str)"),
        ({"data_roots": []}, "data_roots", "must not be empty"),
        ({"state_dir": 3}, "state_dir", "must be a non-empty string, got 3"),
        ({"stat_dir": "x"}, "stat_dir", "unknown key; did you mean 'state_dir'?"),
        ({"jobs": []}, "jobs", None),  # jobs are submitted, not configured
        ({"token": SECRET}, "token", "must be a string of at least 16 characters"),
        ({"host": "0.0.0.0"}, "token", "required when host is not a loopback address (host: 0.0.0.0); or set LORAFUSION_TOKEN"),
        ({"scheduler": {"capacity": "96"}}, "scheduler.capacity", "must be an integer, got '96' (str)"),
        ({"quantize": "int8"}, "model.quantize", "must be one of nf4; got 'int8' (str)"),
    ],
)
def test_each_bad_key_is_named(tmp_path: Path, monkeypatch, overrides: dict, key: str, reason: str | None) -> None:
    monkeypatch.delenv("LORAFUSION_TOKEN", raising=False)
    with pytest.raises(ConfigError) as caught:
        parse_server_config(server_dict(tmp_path, **overrides), tmp_path)
    assert len(caught.value.problems) == 1 and caught.value.problems[0][0] == key, caught.value.problems
    if reason is not None:
        assert caught.value.problems[0][1] == reason
    assert SECRET not in str(caught.value) and "\n" not in str(caught.value)


def test_a_quantized_base_is_accepted(tmp_path: Path) -> None:
    config = parse_server_config(server_dict(tmp_path, quantize="nf4"), tmp_path)
    assert config.training.model.quantize == "nf4"


def test_defaults_and_a_token_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORAFUSION_TOKEN", "t" * 16)
    config = parse_server_config(server_dict(tmp_path, host="0.0.0.0", port=None, window_batches=None), tmp_path)
    assert (config.host, config.port, config.token, config.window_batches) == ("0.0.0.0", 8631, "t" * 16, 4)
    assert (config.admission, config.max_wait_windows) == ("size_aware", 64)
    assert config.data_roots == ((tmp_path / "data").resolve(),) and config.state_dir == tmp_path / "state"
    assert config.training.jobs == () and config.training.output_dir == tmp_path / "state"


def test_a_directory_dataset_may_not_reach_outside_the_data_roots(tmp_path: Path) -> None:
    """Each file a directory dataset is read from (its *.parquet files, the Arrow files its
    state.json names) resolves under the data roots: a link or a name inside it is no way out."""
    import json

    from lorafusion.service.config import data_root_problems

    roots = ((tmp_path / "data").resolve(),)
    (tmp_path / "data").mkdir()
    (tmp_path / "secret.parquet").write_bytes(b"PAR1")
    linked = tmp_path / "data" / "linked"
    linked.mkdir()
    (linked / "a.parquet").write_bytes(b"PAR1")
    (linked / "b.parquet").symlink_to(tmp_path / "secret.parquet")
    problems = data_root_problems({"data": str(linked)}, roots)
    assert problems == [("data", f"{linked} holds {linked / 'b.parquet'}, which resolves outside the server's data_roots ({roots[0]})")]

    saved = tmp_path / "data" / "saved"
    saved.mkdir()
    for name in ("../../secret.arrow", str(tmp_path / "secret.arrow")):
        (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-0.arrow"}, {"filename": name}]}))
        problems = data_root_problems({"data": str(saved)}, roots)
        assert problems == [("data", f"{saved}/state.json names {name}, which resolves outside the server's data_roots ({roots[0]})")]

    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-0.arrow"}]}))
    inner = tmp_path / "data" / "inner.parquet"
    inner.write_bytes(b"PAR1")
    (linked / "b.parquet").unlink()
    (linked / "b.parquet").symlink_to(inner)  # a link that stays under the roots is fine
    assert data_root_problems({"data": str(saved)}, roots) == data_root_problems({"data": str(linked)}, roots) == []
