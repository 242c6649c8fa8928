"""The HTTP API and the CLI on it: bad submissions answered with the named problem and nothing
changed, the token and data-root checks, and submit/jobs/cancel/logs end to end."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest

from lorafusion.cli import main
from lorafusion.runtime.config import ConfigError
from lorafusion.service.client import ServiceError
from lorafusion.service.config import parse_server_config
from service_fixtures import RunningService, job_entry, server_dict, wait_for


def raw_request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def busy_service(tmp_path):
    """A service with one long job queued first, so that it is busy and the queue is not empty."""
    with RunningService(server_dict(tmp_path), tmp_path, microbatch_delay_s=0.2) as service:
        service.client.submit(job_entry(tmp_path, "add", max_steps=200))
        yield service


def submit_refused(service, entry) -> ServiceError:
    before = [job["name"] for job in service.client.jobs()]
    with pytest.raises(ServiceError) as refused:
        service.client.submit(entry)
    assert [job["name"] for job in service.client.jobs()] == before  # (their states move on: they train)
    return refused.value


def test_bad_submissions_are_answered_with_every_named_problem_and_change_nothing(tmp_path, busy_service):
    service = busy_service
    status, body = raw_request(
        f"{service.service.url}/jobs", "POST",
        json.dumps(job_entry(tmp_path, "bad", like="add", lr=-1, r=0, lora_dropout=1.5, max_seq_len=1000, colour="red")).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 400
    keys = {problem["key"] for problem in body["problems"]}
    assert {"lr", "r", "lora_dropout", "max_seq_len", "colour"} <= keys, body
    assert body["error"].startswith(body["problems"][0]["key"])
    assert "capacity" in " ".join(p["reason"] for p in body["problems"] if p["key"] == "max_seq_len")

    assert "already submitted" in str(submit_refused(service, job_entry(tmp_path, "add")))
    bad_data = tmp_path / "data" / "broken.jsonl"
    bad_data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "x"}\n')
    refused = submit_refused(service, job_entry(tmp_path, "broken", like="add", data=str(bad_data)))
    assert refused.problems[0]["key"] == "data" and "line 2" in refused.problems[0]["reason"]
    missing = submit_refused(service, job_entry(tmp_path, "missing", like="add", data=str(tmp_path / "data" / "nope.jsonl")))
    assert missing.problems[0]["key"] == "data" and "not found" in missing.problems[0]["reason"]
    targets = submit_refused(service, job_entry(tmp_path, "targets", like="add", target_modules=["q_proj", "qkv_proj"]))
    assert targets.problems[0]["key"] == "target_modules" and "qkv_proj" in targets.problems[0]["reason"]
    rank = submit_refused(service, job_entry(tmp_path, "rank", like="add", r=48))  # the tiny model's layers are 32 wide
    assert rank.problems[0]["key"] == "r" and "48" in rank.problems[0]["reason"]
    status, body = raw_request(f"{service.service.url}/jobs", "POST", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not JSON" in body["error"]
    assert raw_request(f"{service.service.url}/jobs/nobody")[0] == 404
    assert raw_request(f"{service.service.url}/nowhere")[0] == 404


def test_data_must_lie_under_the_data_roots_after_symlinks(tmp_path, busy_service):
    service = busy_service
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "data" / "link.jsonl").symlink_to(outside)
    for path in (str(outside), str(tmp_path / "data" / "link.jsonl"), str(tmp_path / "data" / ".." / "secret.jsonl")):
        refused = submit_refused(service, job_entry(tmp_path, "sneaky", like="add", data=path))
        assert refused.problems == [{"key": "data", "reason": refused.problems[0]["reason"]}]
        assert "data_roots" in refused.problems[0]["reason"]
    status, _ = raw_request(
        f"{service.service.url}/jobs", "POST", json.dumps(job_entry(tmp_path, "sneaky", like="add", data=str(outside))).encode()
    )
    assert status == 403
    relative = submit_refused(service, job_entry(tmp_path, "relative", like="add", data="data/add.jsonl"))
    assert "absolute" in relative.problems[0]["reason"]


def test_a_token_is_required_when_configured_and_for_any_non_local_bind(tmp_path):
    with pytest.raises(ConfigError, match="token: required when host is not a loopback address"):
        parse_server_config(server_dict(tmp_path, host="0.0.0.0"), tmp_path)
    token = "s3cret-token-of-some-length"
    with RunningService(server_dict(tmp_path, token=token), tmp_path) as service:
        url = f"{service.service.url}/jobs"
        assert raw_request(url)[0] == 401
        assert raw_request(url, headers={"Authorization": "Bearer wrong-token-of-some-length"})[0] == 401
        status, body = raw_request(url, "POST", json.dumps(job_entry(tmp_path, "add")).encode())
        assert status == 401 and "token" in body["error"]
        assert raw_request(url, headers={"Authorization": f"Bearer {token}"}) == (200, {"jobs": []})


def test_the_cli_submits_lists_cancels_and_shows_logs(tmp_path, capsys, monkeypatch):
    job = job_entry(tmp_path, "rev", max_steps=100)
    job["data"] = "data/rev.jsonl"  # relative to the job file, as a user writes it
    (tmp_path / "rev.yaml").write_text(json.dumps(job))
    with RunningService(server_dict(tmp_path), tmp_path, microbatch_delay_s=0.05) as service:
        monkeypatch.setenv("LORAFUSION_URL", service.service.url)
        assert main(["submit", str(tmp_path / "rev.yaml")]) == 0
        assert "submitted job 'rev' (queued)" in capsys.readouterr().out
        assert main(["submit", str(tmp_path / "rev.yaml")]) == 2
        assert "name: a job named 'rev' was already submitted" in capsys.readouterr().err

        wait_for(lambda: service.state("rev")["step"] >= 1, what="rev's first step")
        assert main(["jobs"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[:4] == ["job", "state", "step", "loss"] and table[1].split()[:2] == ["rev", "running"]
        assert main(["cancel", "rev"]) == 0
        assert "cancelled job 'rev' at step" in capsys.readouterr().out
        assert main(["cancel", "rev"]) == 2
        assert "already cancelled" in capsys.readouterr().err
        assert main(["logs", "rev"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert "submitted" in lines[0] and "step 1/100" in lines[2] and "cancelled" in lines[-1]
        assert main(["logs", "nobody"]) == 2
        assert "no job named 'nobody'" in capsys.readouterr().err
    monkeypatch.setenv("LORAFUSION_URL", "http://127.0.0.1:9")
    assert main(["jobs"]) == 2
    assert "cannot reach the service" in capsys.readouterr().err


def test_serve_reports_every_config_problem_in_one_go(tmp_path, capsys):
    config = server_dict(tmp_path, port="http", window_batches=0, parallel={"engine": "megatron", "pipeline_stages": 2},
                         data_roots=[str(tmp_path / "nowhere")])
    del config["state_dir"]
    (tmp_path / "server.yaml").write_text(json.dumps(config))
    assert main(["serve", str(tmp_path / "server.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"lorafusion serve: invalid config {tmp_path / 'server.yaml'}:"
    keys = [line.split(":")[0] for line in err[1:]]
    assert sorted(keys) == ["data_roots[0]", "parallel.engine", "port", "state_dir", "window_batches"], err
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "good.yaml").write_text(json.dumps(server_dict(tmp_path)))
    assert main(["serve", str(tmp_path / "good.yaml"), "--device", "gpu0"]) == 2
    assert capsys.readouterr().err == "lorafusion serve: --device 'gpu0' is not a torch device (e.g. cpu, cuda, cuda:1)\n"


def test_a_state_directory_serves_one_service_at_a_time(tmp_path, capsys):
    from lorafusion.runtime.output_dir import OutputDirError
    from lorafusion.service.server import Service

    with RunningService(server_dict(tmp_path), tmp_path) as service:
        with pytest.raises(OutputDirError, match="in use by another lorafusion process"):
            Service.start(service.config, device="cpu")
        port = service.service.http.server_address[1]
        second = server_dict(tmp_path, state_dir=str(tmp_path / "second"), port=port)
        (tmp_path / "second.yaml").write_text(json.dumps(second))
        assert main(["serve", str(tmp_path / "second.yaml"), "--device", "cpu"]) == 2
        assert "Address already in use" in capsys.readouterr().err
    with RunningService(server_dict(tmp_path, state_dir=str(tmp_path / "second")), tmp_path):
        pass  # the refused start let its state directory go
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty and was not written by lorafusion"):
        Service.start(parse_server_config(server_dict(tmp_path, state_dir=str(tmp_path / "other")), tmp_path))
    assert os.listdir(tmp_path / "other") == ["notes.txt"]
    from lorafusion.runtime.run_directory import RunDirectory

    RunDirectory.claim(tmp_path / "training-run", ["checkpoints"], resume=False, overwrite=False).release()
    with pytest.raises(OutputDirError, match="holds a lorafusion train run, not a service's state"):
        Service.start(parse_server_config(server_dict(tmp_path, state_dir=str(tmp_path / "training-run")), tmp_path))


@pytest.mark.parametrize(
    "problem, host, reason",
    [
        ("in use", "127.0.0.1", "Address already in use (another process is listening there: stop it, or choose another "
                                "port; 0 takes any free one)"),
        ("not this machine's", "192.0.2.1", "Cannot assign requested address (the host is not an address of this machine)"),
        ("not permitted", "127.0.0.1", "Permission denied (not permitted: ports below 1024 need privileges; choose a port >= 1024)"),
    ],
)
def test_a_port_serve_cannot_listen_on_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, problem, host, reason):
    """One line naming host:port and the problem, exit 2, before the base model loads (which takes
    minutes for a large one) and with the state directory left as it was."""
    import socket

    from lorafusion.runtime.run_directory import RunDirectory
    from lorafusion.service.server import STATE_ENTRIES

    def no_model(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr("lorafusion.service.trainer.build_base_model", no_model)
    monkeypatch.setenv("LORAFUSION_TOKEN", "t" * 16)  # a non-loopback host needs one
    RunDirectory.claim(tmp_path / "state", STATE_ENTRIES, resume=False, overwrite=False).release()
    before = {p: p.read_bytes() for p in (tmp_path / "state").rglob("*") if p.is_file()}
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1] if problem == "in use" else 1
        if problem == "not permitted":  # (these tests may run as root, who may bind any port)
            def refused(self, address):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(socket.socket, "bind", refused)
        (tmp_path / "server.yaml").write_text(json.dumps(server_dict(tmp_path, host=host, port=port)))
        assert main(["serve", str(tmp_path / "server.yaml"), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"lorafusion serve: cannot listen on {host}:{port}: {reason}\n" and captured.out == ""
    assert {p: p.read_bytes() for p in (tmp_path / "state").rglob("*") if p.is_file()} == before
    RunDirectory.claim(tmp_path / "state", STATE_ENTRIES, resume=True, overwrite=False).release()  # not left locked


def test_requests_while_the_base_model_loads_are_answered_503(tmp_path, monkeypatch):
    import socket
    import threading

    import lorafusion.service.trainer as service_trainer
    from lorafusion.service.server import Service

    loading, loaded = threading.Event(), threading.Event()
    build = service_trainer.build_base_model

    def slow_build(*args, **kwargs):
        loading.set()
        assert loaded.wait(60)
        return build(*args, **kwargs)

    monkeypatch.setattr(service_trainer, "build_base_model", slow_build)
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    config = parse_server_config(server_dict(tmp_path, port=port), tmp_path)
    started = []
    thread = threading.Thread(target=lambda: started.append(Service.start(config, device="cpu")))
    thread.start()
    assert loading.wait(60)
    status, body = raw_request(f"http://127.0.0.1:{port}/jobs")
    assert (status, body) == (503, {"error": "the service is starting (loading its base model); try again shortly", "problems": []})
    loaded.set()
    thread.join(60)
    try:
        assert raw_request(f"http://127.0.0.1:{port}/jobs") == (200, {"jobs": []})
    finally:
        started[0].trainer.close()
        started[0].close()
