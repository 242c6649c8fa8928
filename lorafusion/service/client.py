"""A client of the service's HTTP JSON API (urllib), for `lorafusion submit/jobs/cancel/logs`."""

from __future__ import annotations

import http.client
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_PORT = 8631
TOKEN_ENV = "LORAFUSION_TOKEN"
URL_ENV = "LORAFUSION_URL"
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
PATH_KEYS = ("data", "eval_data")


class ServiceError(Exception):
    """The service's answer to a refused request (its one-line error and problems, and the URL of
    the service), or why there was none (the message names the URL)."""

    def __init__(self, message: str, problems: list[dict] = (), url: str | None = None):
        self.problems, self.url = list(problems), url
        super().__init__(message)


def add_connection_arguments(parser) -> None:
    parser.add_argument("--url", default=None, help=f"the service (default: ${URL_ENV}, else {DEFAULT_URL})")
    parser.add_argument("--token", default=None, help=f"its token, if it has one (default: ${TOKEN_ENV})")


class ServiceClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = 120.0):
        given = url or os.environ.get(URL_ENV) or DEFAULT_URL
        self.url = given.rstrip("/")
        self.token = token or os.environ.get(TOKEN_ENV)
        self.timeout_s = timeout_s
        parts = urllib.parse.urlsplit(self.url)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServiceError(f"{given!r} is not the service's URL: expected one like {DEFAULT_URL} (--url or ${URL_ENV})")

    @classmethod
    def from_args(cls, args) -> ServiceClient:
        return cls(args.url, args.token)

    def request(self, method: str, path: str, key: str, body: object = None):
        """The `key` field of the service's JSON answer; ServiceError if it refused the request
        or no lorafusion service answered."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = _json_or_none(response.read())
        except urllib.error.HTTPError as error:
            answer = _json_or_none(error.read())
            if not isinstance(answer, dict) or not isinstance(answer.get("error"), str):
                raise ServiceError(f"{self.url} answered HTTP {error.code} {error.reason} to {method} {path}; is it a lorafusion service?") from None
            raise ServiceError(f"{answer['error']} (service at {self.url})", answer.get("problems") or [], self.url) from None
        except TimeoutError:  # it has the request, perhaps a submission whose data takes long to check
            raise ServiceError(
                f"no answer from {self.url} within {self.timeout_s:g} s to {method} {path}; it may still be carried out: see `lorafusion jobs`"
            ) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ServiceError(f"cannot reach the service at {self.url} ({reason}); is `lorafusion serve` running?") from None
        except http.client.HTTPException as error:
            raise ServiceError(f"{self.url} did not answer as an HTTP server ({type(error).__name__}); is it a lorafusion service?") from None
        except ValueError as error:  # e.g. a token that is not latin-1 text, which no header can carry
            raise ServiceError(f"cannot send the request to {self.url}: {error}") from None
        if not isinstance(answer, dict) or key not in answer:
            raise ServiceError(f"{self.url} answered {method} {path} without a JSON {key!r}; is it a lorafusion service?")
        return answer[key]

    def submit(self, job: dict) -> dict:
        return self.request("POST", "/jobs", "job", job)

    def jobs(self) -> list[dict]:
        return self.request("GET", "/jobs", "jobs")

    def job(self, name: str) -> dict:
        return self.request("GET", f"/jobs/{_quoted(name)}", "job")

    def cancel(self, name: str) -> dict:
        return self.request("POST", f"/jobs/{_quoted(name)}/cancel", "job")

    def logs(self, name: str) -> list[dict]:
        return self.request("GET", f"/jobs/{_quoted(name)}/logs", "lines")

    def metrics(self, name: str) -> list[dict]:
        return self.request("GET", f"/jobs/{_quoted(name)}/metrics", "metrics")


def _quoted(name: str) -> str:
    """The name as one path segment: '/', '..', spaces and the like cannot change the endpoint."""
    return urllib.parse.quote(name, safe="")


def _json_or_none(data: bytes) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def json_problem(value: object, key: str = "<job>") -> str | None:
    """'KEY: VALUE (TYPE)' of the first value in a job mapping that JSON cannot carry (a YAML date,
    binary, NaN or infinity, a key that is not a string), or None."""
    if value is None or isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return None
    if isinstance(value, list):
        return next(filter(None, (json_problem(item, f"{key}[{i}]") for i, item in enumerate(value))), None)
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                return f"{key}: a key {name!r} ({type(name).__name__})"
            problem = json_problem(item, name if key == "<job>" else f"{key}.{name}")
            if problem:
                return problem
        return None
    return f"{key}: {value} ({type(value).__name__})"


def job_with_absolute_paths(job: object, base_dir: Path) -> object:
    """The job mapping with its data paths resolved against the job file's directory (the
    service resolves nothing relative: it runs elsewhere)."""
    if not isinstance(job, dict):
        return job
    resolved = dict(job)
    for key in PATH_KEYS:
        if isinstance(resolved.get(key), str) and resolved[key]:
            resolved[key] = str((base_dir / Path(resolved[key]).expanduser()).absolute())
    return resolved
