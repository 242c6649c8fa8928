"""`lorafusion submit/jobs/cancel/logs` when the service is down, the URL is wrong or something
else answers: one line on stderr naming the URL and the problem, exit code 2, no traceback. A
job name goes into the URL as one path segment whatever it holds. `lorafusion serve` interrupted
while it starts, or signalled twice while it stops: one line, exit 130."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lorafusion.cli import main


class FakeService(BaseHTTPRequestHandler):
    """Answers every request with the (status, raw body) of `self.server.answer`; records paths."""

    def log_message(self, *args) -> None:
        pass

    def _reply(self) -> None:
        self.server.paths.append(self.path)
        status, body = self.server.answer
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        try:
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (the timeout test): say nothing into a later test's stderr

    do_GET = do_POST = _reply


@pytest.fixture
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeService)
    server.daemon_threads = False  # server_close() then waits for a slow reply to end inside its own test
    server.paths, server.answer = [], (200, b"{}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def not_http():
    """A TCP server that answers every connection with a line that is not HTTP."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(4096)
                connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def url_of(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err


@pytest.mark.parametrize("command", [["jobs"], ["cancel", "x"], ["logs", "x"]])
def test_a_url_that_is_not_a_service_url_is_named(capsys, command):
    for url in ("foo", "ftp://127.0.0.1:8631", "http://127.0.0.1:notaport", "http://"):
        err = one_line_error(capsys, [*command, "--url", url])
        assert err.startswith(f"lorafusion {command[0]}: '{url}' is not the service's URL"), err


def test_a_server_that_does_not_speak_http_is_named(capsys, not_http):
    err = one_line_error(capsys, ["jobs", "--url", not_http])
    assert err == f"lorafusion jobs: {not_http} did not answer as an HTTP server (BadStatusLine); is it a lorafusion service?\n"


@pytest.mark.parametrize("answer", [(200, b"hello"), (200, b"[1]"), (200, b'{"other": 1}'), (404, b"[]"), (500, b"<html>")])
def test_an_answer_that_is_not_the_api_is_named(capsys, fake, answer):
    fake.answer = answer
    err = one_line_error(capsys, ["jobs", "--url", url_of(fake)])
    assert err.startswith(f"lorafusion jobs: {url_of(fake)} answered ") and "lorafusion service?" in err, err


def test_a_refusal_names_the_service(capsys, fake):
    fake.answer = (404, json.dumps({"error": "no job named 'x'", "problems": []}).encode())
    err = one_line_error(capsys, ["cancel", "x", "--url", url_of(fake)])
    assert err == f"lorafusion cancel: no job named 'x' (service at {url_of(fake)})\n"


@pytest.mark.parametrize("name, segment", [("a b", "a%20b"), ("../jobs", "..%2Fjobs"), ("x?y#z", "x%3Fy%23z")])
def test_a_job_name_is_one_path_segment(capsys, fake, name, segment):
    fake.answer = (404, json.dumps({"error": f"no job named {name!r}", "problems": []}).encode())
    one_line_error(capsys, ["logs", name, "--url", url_of(fake)])
    one_line_error(capsys, ["cancel", name, "--url", url_of(fake)])
    assert fake.paths == [f"/jobs/{segment}/logs", f"/jobs/{segment}/cancel"]


def test_a_service_that_is_down_is_named(capsys):
    with socket.create_server(("127.0.0.1", 0)) as unused:
        url = f"http://127.0.0.1:{unused.getsockname()[1]}"
    for command in (["jobs"], ["cancel", "x"], ["logs", "x"]):
        err = one_line_error(capsys, [*command, "--url", url])
        assert err.startswith(f"lorafusion {command[0]}: cannot reach the service at {url} ("), err


def test_ctrl_c_while_serve_starts_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    from lorafusion.service.server import Service
    from service_fixtures import server_dict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what SIGINT raises while the base model loads

    monkeypatch.setattr(Service, "start", interrupted)
    (tmp_path / "server.yaml").write_text(json.dumps(server_dict(tmp_path)))
    assert main(["serve", str(tmp_path / "server.yaml"), "--device", "cpu"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "lorafusion serve: interrupted while starting; accepted jobs continue at the next start\n"


def test_no_answer_in_time_says_the_request_may_still_complete(fake, monkeypatch):
    from lorafusion.service.client import ServiceClient, ServiceError

    def slow_reply(handler):
        threading.Event().wait(3)  # longer than the client waits (a submission of a large dataset)
        FakeService._reply(handler)

    monkeypatch.setattr(FakeService, "do_POST", slow_reply)
    with pytest.raises(ServiceError) as refused:
        ServiceClient(url_of(fake), timeout_s=0.5).submit({"name": "big"})
    assert str(refused.value) == (
        f"no answer from {url_of(fake)} within 0.5 s to POST /jobs; it may still be carried out: see `lorafusion jobs`"
    )


@pytest.mark.parametrize(
    "line, named",
    [("notes: 2024-01-01", "notes: 2024-01-01 (date)"), ("lr: .nan", "lr: nan (float)"),
     ("target_modules: [q_proj, !!binary aGk=]", "target_modules[1]: b'hi' (bytes)"), ("columns: {1: text}", "columns: a key 1 (int)")],
)
def test_a_job_file_value_json_cannot_carry_is_named(tmp_path, capsys, line, named):
    (tmp_path / "job.yaml").write_text(f"name: j\ndata: d.jsonl\n{line}\n")
    err = one_line_error(capsys, ["submit", str(tmp_path / "job.yaml"), "--url", "http://127.0.0.1:9"])
    assert err == f"lorafusion submit: {tmp_path / 'job.yaml'}: {named} cannot be sent as JSON; write it as a string or number\n"


def test_a_second_signal_stops_serve_at_once(tmp_path, capsys, monkeypatch):
    """SIGTERM (or Ctrl-C) stops between two microbatches and checkpoints the running jobs; a
    second one while that takes long stops at once (as a kill -9 would: nothing accepted is lost),
    one line and exit 130."""
    import signal
    import time

    from lorafusion.service.server import Service
    from lorafusion.service.trainer import ServiceTrainer
    from service_fixtures import server_dict

    started, stopping, checkpointed = threading.Event(), threading.Event(), threading.Event()
    start = Service.start

    def start_and_tell(*args, **kwargs):
        service = start(*args, **kwargs)
        started.set()
        return service

    def slow_checkpoints(self):
        stopping.set()
        time.sleep(60)  # a stop that takes long (many large jobs to checkpoint)
        checkpointed.set()

    monkeypatch.setattr(Service, "start", start_and_tell)
    monkeypatch.setattr(ServiceTrainer, "_checkpoint_running", slow_checkpoints)

    def signal_twice():  # to the main thread: a signal taken by another thread wakes no sleep there
        assert started.wait(60)
        while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # serve's handler not installed yet
            time.sleep(0.01)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        assert stopping.wait(60)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    threading.Thread(target=signal_twice, daemon=True).start()
    (tmp_path / "server.yaml").write_text(json.dumps(server_dict(tmp_path)))
    assert main(["serve", str(tmp_path / "server.yaml"), "--device", "cpu"]) == 130
    assert stopping.is_set() and not checkpointed.is_set()  # returned during the slow stop, not after it
    err = capsys.readouterr().err
    assert err == "lorafusion serve: stopped at once by a second signal; accepted jobs continue from their last checkpoints at the next start\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
