"""A client of the service's HTTP JSON API (urllib), for `lorafusion submit/jobs/cancel/logs`."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_PORT = 8631
TOKEN_ENV = "LORAFUSION_TOKEN"
URL_ENV = "LORAFUSION_URL"
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
PATH_KEYS = ("data", "eval_data")


class ServiceError(Exception):
    """The service's answer to a refused request (its one-line error and problems), or why there
    was none."""

    def __init__(self, message: str, problems: list[dict] = ()):
        self.problems = list(problems)
        super().__init__(message)


def add_connection_arguments(parser) -> None:
    parser.add_argument("--url", default=None, help=f"the service (default: ${URL_ENV}, else {DEFAULT_URL})")
    parser.add_argument("--token", default=None, help=f"its token, if it has one (default: ${TOKEN_ENV})")


class ServiceClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = 120.0):
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        self.token = token or os.environ.get(TOKEN_ENV)
        self.timeout_s = timeout_s

    @classmethod
    def from_args(cls, args) -> ServiceClient:
        return cls(args.url, args.token)

    def request(self, method: str, path: str, body: object = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            try:
                answer = json.loads(error.read())
            except ValueError:
                raise ServiceError(f"{self.url} answered HTTP {error.code} {error.reason}") from None
            raise ServiceError(answer.get("error", f"HTTP {error.code}"), answer.get("problems", [])) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ServiceError(f"cannot reach the service at {self.url} ({reason}); is `lorafusion serve` running?") from None

    def submit(self, job: dict) -> dict:
        return self.request("POST", "/jobs", job)["job"]

    def jobs(self) -> list[dict]:
        return self.request("GET", "/jobs")["jobs"]

    def job(self, name: str) -> dict:
        return self.request("GET", f"/jobs/{name}")["job"]

    def cancel(self, name: str) -> dict:
        return self.request("POST", f"/jobs/{name}/cancel")["job"]

    def logs(self, name: str) -> list[dict]:
        return self.request("GET", f"/jobs/{name}/logs")["lines"]


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
