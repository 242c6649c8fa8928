"""The service's HTTP JSON API (stdlib http.server, one thread per request):

    POST /jobs                 body: one job mapping (as in a training config's jobs list, paths
                               absolute) -> 201 {"job": JOB}
    GET  /jobs                 -> 200 {"jobs": [JOB, ...]} in submission order
    GET  /jobs/NAME            -> 200 {"job": JOB}
    POST /jobs/NAME/cancel     -> 200 {"job": JOB} once the trainer has stopped it
    GET  /jobs/NAME/logs       -> 200 {"name": NAME, "lines": [{"at": UNIX_TIME, "line": TEXT}, ...]}
    GET  /jobs/NAME/metrics    -> 200 {"name": NAME, "metrics": [{"step", "at", "loss", "tokens", "lr",
                               "tokens_per_s", "eval_loss" (evaluated steps only)}, ...]}

Errors: {"error": ONE_LINE, "problems": [{"key": KEY_PATH, "reason": TEXT}, ...]} with 400 (the
job does not validate: every problem at once; a body that is not JSON or whose Content-Length is
not a length), 401 (token missing or wrong, when the server has one: "Authorization: Bearer TOKEN"),
403 (data outside the server's data_roots), 404, 408 (the body did not arrive within
REQUEST_TIMEOUT_S), 409 (name taken; cancel of an ended job), 411 (no Content-Length), 413 (body
over 1 MiB). What the API answers is committed first. A connection whose request body was not read
whole is closed after the answer (the rest of a body is never taken for a request). http.server's
own refusals (501 for another method, 400 for a malformed request line, 431) are JSON too.
While the service loads its base model every request is answered 503 (it listens from the start,
so that a port in use is found before the model loads).
"""

from __future__ import annotations

import errno
import hmac
import json
import math
import re
import socket
import sys
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .store import TERMINAL_STATES
from .trainer import ServiceTrainer, SubmissionError

MAX_BODY_BYTES = 1 << 20
REQUEST_TIMEOUT_S = 30.0
CANCEL_WAIT_S = 60.0
_JOB_PATH = re.compile(r"/jobs/([A-Za-z0-9_-]+)(/cancel|/logs|/metrics)?")


class ApiError(Exception):
    def __init__(self, status: int, message: str, problems: list[tuple[str, str]] = ()):
        self.status, self.message, self.problems = status, message, list(problems)
        super().__init__(message)


class ListenError(OSError):
    """The service cannot listen on its host:port (in use, not permitted, not this machine's address)."""


# What to do about the usual reasons a bind fails.
_BIND_HINTS = {
    errno.EADDRINUSE: "another process is listening there: stop it, or choose another port; 0 takes any free one",
    errno.EACCES: "not permitted: ports below 1024 need privileges; choose a port >= 1024",
    errno.EADDRNOTAVAIL: "the host is not an address of this machine",
}


class ServiceHTTPServer(ThreadingHTTPServer):
    """Listens once constructed (ListenError if it cannot); answers 503 until `trainer` is set."""

    daemon_threads = True
    allow_reuse_port = False  # a second service on the same port must be refused, not share it

    def __init__(self, address: tuple[str, int], token: str | None):
        self.trainer: ServiceTrainer | None = None
        self.token = token
        host, port = address
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            super().__init__(address, _Handler)
        except OSError as error:
            reason = error.strerror or str(error)
            if isinstance(error, socket.gaierror):
                reason = f"cannot resolve the host ({reason})"
            hint = _BIND_HINTS.get(error.errno)
            raise ListenError(f"cannot listen on {where}: {reason}" + (f" ({hint})" if hint else "")) from None

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the client hung up or stalled: its answer cannot be sent, and nothing here broke
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: ServiceHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S  # socket timeout: a client that stops sending does not hold a thread for ever

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # the job logs are the service's log; no line per request on stderr

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (an unsupported method, a malformed request line, too many
        or too long headers) in the API's JSON, not its HTML page; the connection is closed."""
        if self.request_version == "HTTP/0.9":  # not parsed yet: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        text = " ".join((message or self.responses.get(code, ("error",))[0]).split())
        data = json_body({"error": text, "problems": []})
        self.close_connection = True
        self.send_response(code, message)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, route) -> None:
        self._body_read = False
        try:
            self._check_token()
            if self.server.trainer is None:
                raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "the service is starting (loading its base model); try again shortly")
            status, body = route(self.path.split("?", 1)[0].rstrip("/") or "/")
        except ApiError as error:
            status = error.status
            body = {"error": error.message, "problems": [{"key": k, "reason": r} for k, r in error.problems]}
        except SubmissionError as error:
            status = error.status
            body = {"error": _one_line(error.problems), "problems": [{"key": k, "reason": r} for k, r in error.problems]}
        except Exception as error:  # noqa: BLE001 - a bug: answered (500) and printed, the service goes on
            traceback.print_exc()
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(error).__name__}: {error}", "problems": []}
        if not self._body_read and (self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers):
            self.close_connection = True
        data = json_body(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _check_token(self) -> None:
        expected = self.server.token
        if expected is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            # The body is not read: drop the connection after answering.
            self.close_connection = True
            raise ApiError(HTTPStatus.UNAUTHORIZED, "missing or wrong token: send 'Authorization: Bearer TOKEN'")

    def _read_json(self) -> object:
        declared = self.headers.get("Content-Length")
        if declared is None:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "a JSON body with Content-Length is required")
        if not re.fullmatch(r"\s*[0-9]+\s*", declared):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"Content-Length must be a number of bytes, got {declared[:40]!r}")
        length = int(declared)
        if length > MAX_BODY_BYTES:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes is over {MAX_BODY_BYTES}")
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raise ApiError(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {self.timeout:g} s") from None
        if len(raw) < length:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(raw)} of its {length} bytes")
        self._body_read = True
        try:
            return json.loads(raw or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            reason = "nested too deeply" if isinstance(error, RecursionError) else error
            raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {reason}") from None

    def _get(self, path: str) -> tuple[int, dict]:
        store = self.server.trainer.store
        if path == "/jobs":
            return HTTPStatus.OK, {"jobs": store.all()}
        name, action = _job_route(path)
        job = _existing(store, name)
        if action is None:
            return HTTPStatus.OK, {"job": job}
        if action == "/logs":
            return HTTPStatus.OK, {"name": name, "lines": store.logs(name)}
        if action == "/metrics":
            return HTTPStatus.OK, {"name": name, "metrics": store.metrics(name)}
        raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"use POST for {path}")

    def _post(self, path: str) -> tuple[int, dict]:
        trainer = self.server.trainer
        if path == "/jobs":
            entry = self._read_json()
            return HTTPStatus.CREATED, {"job": trainer.submit(entry)}
        name, action = _job_route(path)
        if action != "/cancel":
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path}")
        job = _existing(trainer.store, name)
        if job["state"] in TERMINAL_STATES:
            raise ApiError(HTTPStatus.CONFLICT, f"job {name!r} has already {job['state']}; nothing to cancel")
        trainer.request_cancel(name)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline:
            job = trainer.store.get(name)
            if job["state"] in TERMINAL_STATES:
                break
            time.sleep(0.05)
        return HTTPStatus.OK, {"job": job}


def _job_route(path: str) -> tuple[str, str | None]:
    match = _JOB_PATH.fullmatch(path)
    if match is None:
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
    return match.group(1), match.group(2)


def _existing(store, name: str) -> dict:
    job = store.get(name)
    if job is None:
        raise ApiError(HTTPStatus.NOT_FOUND, f"no job named {name!r}")
    return job


def json_body(body: dict) -> bytes:
    """An answer as strict JSON: a non-finite number (a diverged job's loss) is null, as JSON has
    no NaN or Infinity and a browser's JSON.parse refuses Python's."""

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(body), allow_nan=False).encode()


def _one_line(problems: list[tuple[str, str]]) -> str:
    first_key, first_reason = problems[0]
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return f"{first_key}: {first_reason}{more}"
