"""Malformed requests to the service's HTTP API: each answered with a 4xx JSON error in one line,
at once; never a hang, a 500 or a traceback, and never a body left unread to be taken for the
next request on a kept-alive connection."""

from __future__ import annotations

import json
import socket

import pytest

from lorafusion.service import http_api
from service_fixtures import RunningService, server_dict


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("http")
    with RunningService(server_dict(tmp_path), tmp_path) as running:
        yield running


def exchange(service, raw: bytes, timeout_s: float = 10.0) -> list[tuple[int, dict]]:
    """Send `raw` on one connection; every (status, JSON body) answered until the server closes it
    or `timeout_s` passes with nothing more."""
    host, port = service.service.http.server_address[:2]
    answers, buffer = [], b""
    with socket.create_connection((host, port), timeout=timeout_s) as connection:
        connection.sendall(raw)
        while True:
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no answer within {timeout_s} s; got {answers}") from None
            if not chunk:
                return answers
            buffer += chunk
            while b"\r\n\r\n" in buffer:
                head, _, rest = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = dict(line.split(": ", 1) for line in lines[1:])
                length = int(headers["Content-Length"])
                if len(rest) < length:
                    break
                answers.append((int(lines[0].split()[1]), json.loads(rest[:length])))
                buffer = rest[length:]
                if headers.get("Connection") == "close":
                    return answers


def post(path: str, body: bytes, length: str | None = None, keep_alive: bool = False) -> bytes:
    length = str(len(body)) if length is None else length
    connection = "" if keep_alive else "Connection: close\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{connection}Content-Length: {length}\r\n\r\n".encode() + body


def assert_one_line_error(answers, status: int, words: str) -> None:
    assert [code for code, _ in answers] == [status], answers
    error = answers[0][1]["error"]
    assert words in error and "\n" not in error, error


def test_a_negative_content_length_is_refused_not_waited_on(service):
    assert_one_line_error(exchange(service, post("/jobs", b"{}", length="-1")), 400, "Content-Length")


def test_a_body_shorter_than_its_content_length_times_out(service, monkeypatch):
    monkeypatch.setattr(http_api._Handler, "timeout", 1.0)
    assert_one_line_error(exchange(service, post("/jobs", b"{}", length="50"), timeout_s=10), 408, "body")


def test_a_deeply_nested_body_is_not_json_to_us(service):
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_one_line_error(exchange(service, post("/jobs", deep)), 400, "not JSON")


@pytest.mark.parametrize("body", [b"[1, 2]", b"", b"\"a job\""])
def test_a_body_that_is_not_a_mapping_is_a_bad_request(service, body):
    assert_one_line_error(exchange(service, post("/jobs", body)), 400, "must be a mapping")


def test_an_unread_body_is_never_taken_for_the_next_request(service):
    smuggled = b"GET /jobs HTTP/1.1\r\nHost: x\r\n\r\n"
    answers = exchange(service, post("/jobs/nobody/cancel", smuggled, keep_alive=True))
    assert [code for code, _ in answers] == [404], answers


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"PUT /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 501),  # a method the API has not
        (b"GET /jobs HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),  # a malformed request line
        (b"GET /jobs HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),  # over http.client's 100 headers
    ],
)
def test_requests_http_server_refuses_itself_are_answered_in_json_too(service, raw, status):
    answers = exchange(service, raw)
    assert [code for code, _ in answers] == [status], answers
    assert "\n" not in answers[0][1]["error"]


def test_a_client_gone_before_its_answer_prints_no_traceback(service, capsys):
    """The answer to a client that hung up (or stalled past the socket timeout) cannot be sent:
    nothing to tell anyone, no traceback on the service's stderr; any other error still prints."""
    http = service.service.http
    for gone in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset"), TimeoutError("timed out")):
        try:
            raise gone
        except OSError:
            http.handle_error(None, ("127.0.0.1", 1))
    assert capsys.readouterr().err == ""
    try:
        raise KeyError("a bug")
    except KeyError:
        http.handle_error(None, ("127.0.0.1", 1))
    assert "KeyError: 'a bug'" in capsys.readouterr().err


def test_answers_are_strict_json_even_for_a_non_finite_loss():
    # A diverged job's loss or eval loss may be inf or NaN: JSON has neither (a browser's
    # JSON.parse refuses Python's NaN/Infinity), so they are answered as null.
    body = {"jobs": [{"name": "a", "loss": float("inf"), "eval_loss": float("nan"), "step": 3, "tokens_per_s": 1.5}]}

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    answer = json.loads(http_api.json_body(body), parse_constant=refuse)
    assert answer == {"jobs": [{"name": "a", "loss": None, "eval_loss": None, "step": 3, "tokens_per_s": 1.5}]}
