"""SERVER.yaml for `lorafusion serve`, and the jobs submitted to it.

The base-model sections are those of a training config (model, tokenizer, scheduler, parallel,
backend, checkpoint_every), checked by the same parser; a submitted job is one entry of a training
config's `jobs` list, checked by the same parser in the context of the server's sections (so its
max_seq_len meets the same capacity and position limits). Every problem is reported at once, each
with its key path. Server keys::

    state_dir: serve-state      # required: SQLite queue, checkpoints, adapters (relative to this file)
    data_roots: [data]          # required: a job's data must lie under one of these (after symlinks)
    host: 127.0.0.1             # a non-loopback host needs `token`
    port: 8631
    token: null                 # clients send it as "Authorization: Bearer TOKEN"
    window_batches: 4           # global batches per job in one planning window
    admission: size_aware       # or all_live: which running jobs each window trains (admission.py)
    max_wait_windows: 64        # size_aware: a job left out this many windows in a row goes first
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, Strict, ValidationError, ValidationInfo, model_validator

from lorafusion.runtime.config import ConfigError, JobSpec, TrainConfig, parse_config
from lorafusion.runtime.config_errors import fail, problem
from lorafusion.runtime.config_schema import Directory, NonEmptyStr, PositiveInt, choice, without_nulls
from lorafusion.runtime.data_sources import SAVE_TO_DISK_MARKER
from lorafusion.scheduler.admission import DEFAULT_MAX_WAIT_WINDOWS

from .admission import ADMISSIONS
from .data_access import RootedOpener
from lorafusion.safe_yaml import YAMLInputError, load_yaml

from .client import DEFAULT_PORT, TOKEN_ENV

TRAINING_KEYS = ("model", "tokenizer", "scheduler", "parallel", "backend", "checkpoint_every")
MIN_TOKEN_LENGTH = 16


def _token(token: object) -> str:
    if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:  # never echoed: it is a secret
        fail(f"must be a string of at least {MIN_TOKEN_LENGTH} characters")
    return token


def _token_off_loopback(token: str | None, info: ValidationInfo) -> str | None:
    host = info.data.get("host")
    if token is None and host is not None and not is_loopback(host):
        fail(f"required when host is not a loopback address (host: {host}); or set {TOKEN_ENV}")
    return token


class ServerKeys(BaseModel):
    """SERVER.yaml's own keys; the training sections beside them are a training config's."""

    model_config = ConfigDict(extra="forbid")

    state_dir: NonEmptyStr
    data_roots: Annotated[list[Directory], Field(min_length=1)]
    host: NonEmptyStr = "127.0.0.1"
    token: Annotated[Annotated[str, PlainValidator(_token)] | None, Field(validate_default=True), AfterValidator(_token_off_loopback)] = None
    port: Annotated[int, Strict(), Field(ge=0, le=65535)] = DEFAULT_PORT  # 0: any free port
    window_batches: PositiveInt = 4
    admission: choice(ADMISSIONS) = "size_aware"
    max_wait_windows: PositiveInt = DEFAULT_MAX_WAIT_WINDOWS

    _nulls_are_defaults = model_validator(mode="before")(without_nulls)


SERVER_KEYS = tuple(ServerKeys.model_fields)


@dataclass(frozen=True)
class ServerConfig:
    training: TrainConfig  # no jobs; output_dir is the state directory
    state_dir: Path
    data_roots: tuple[Path, ...]
    host: str
    port: int
    token: str | None
    window_batches: int
    admission: str
    max_wait_windows: int


def load_server_config(path: str | os.PathLike) -> ServerConfig:
    config_path = Path(path).expanduser().resolve()
    try:
        data = load_yaml(config_path.read_text(encoding="utf-8"), str(config_path))
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([("<file>", f"cannot read {config_path}: {getattr(error, 'strerror', None) or error}")]) from None
    except YAMLInputError as error:
        raise ConfigError([("<file>", str(error))]) from None
    return parse_server_config(data, config_path.parent)


def parse_server_config(data: object, base_dir: Path) -> ServerConfig:
    """SERVER.yaml's mapping: its own keys (ServerKeys) and the training sections (the training
    config's parser, with state_dir as output_dir), every problem of both at once."""
    if not isinstance(data, dict):
        raise ConfigError([("<file>", "must be a mapping with keys model, state_dir, data_roots, ...")])
    own = {key: value for key, value in data.items() if key not in TRAINING_KEYS}
    own["token"] = data.get("token") or os.environ.get(TOKEN_ENV) or None
    problems: list[tuple[str, str]] = []
    server = training = None
    try:
        server = ServerKeys.model_validate(own, context={"base_dir": base_dir})
    except ValidationError as error:
        problems += [problem(details, own, lambda loc: [*SERVER_KEYS, *TRAINING_KEYS] if len(loc) == 1 else None) for details in error.errors()]
    sections = {key: data[key] for key in TRAINING_KEYS if key in data}
    if isinstance(own.get("state_dir"), str) and own["state_dir"]:
        sections["output_dir"] = own["state_dir"]
    try:
        training = parse_config(sections, base_dir, require_jobs=False)
    except ConfigError as error:
        problems += error.problems
    if training is not None and training.parallel.engine != "none":
        problems.append(("parallel.engine", f"{training.parallel.engine!r}: lorafusion serve trains in one process (engine: none)"))
    if problems:
        raise ConfigError(problems)
    data_roots = tuple(Path(root).resolve() for root in server.data_roots)
    return ServerConfig(
        training, training.output_dir, data_roots, server.host, server.port, server.token, server.window_batches,
        server.admission, server.max_wait_windows,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_job(entry: object, server: ServerConfig) -> JobSpec:
    """A submitted job (one entry of a training config's `jobs` list; paths absolute), checked by the
    training config's parser against the server's sections. Raises ConfigError with every problem,
    key paths relative to the job ("lr", "target_modules", ...). The caller checks
    data_root_problems first (ServiceTrainer.validate): the parser reads the paths."""
    training = server.training
    sections = {
        "model": _model_section(training),
        "tokenizer": training.tokenizer,
        "scheduler": vars(training.scheduler),
        "jobs": [entry],
        "output_dir": str(server.state_dir),
    }
    try:
        return parse_config(sections, server.state_dir).jobs[0]
    except ConfigError as error:
        raise ConfigError([(_job_key(key), reason) for key, reason in error.problems]) from None


def _model_section(training: TrainConfig) -> dict:
    model = training.model
    if model.path is not None:
        return {"path": model.path}
    return {"architecture": model.architecture, "config": model.config}


def _job_key(key: str) -> str:
    for prefix in ("jobs[0].", "jobs[0]"):
        if key.startswith(prefix):
            return key[len(prefix):] or "<job>"
    return "<job>" if key == "jobs" else key


def data_root_problems(entry: object, roots: tuple[Path, ...]) -> list[tuple[str, str]]:
    """The job's data files (data, eval_data) must be absolute paths that resolve, symlinks
    followed, under one of `roots`: no reading arbitrary files through a submitted path."""
    if not isinstance(entry, dict):
        return [("<job>", "must be a mapping (one entry of a training config's jobs list)")]
    problems = []
    for key in ("data", "eval_data"):
        value = entry.get(key)
        if value is None or not isinstance(value, str):
            continue  # a missing or mistyped path is the parser's to report
        path = Path(value)
        if not path.is_absolute():
            problems.append((key, f"must be an absolute path (lorafusion submit resolves it), got {value!r}"))
            continue
        resolved = path.resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            problems.append((key, f"{value} is not under the server's data_roots ({', '.join(map(str, roots))})"))
        elif resolved.is_dir():
            problems += [(key, f"{where}, which resolves outside the server's data_roots ({', '.join(map(str, roots))})")
                         for where in _ways_out(value, resolved, roots)]
    return problems


def _ways_out(value: str, directory: Path, roots: tuple[Path, ...]) -> list[str]:
    """What in a directory dataset would be read from outside `roots`: an entry that is a link
    out (its *.parquet files are read through links), a data file its save_to_disk state.json
    names by a path out of it (datasets joins the name to the directory as written)."""
    def outside(path: Path) -> bool:
        return not any(path.resolve().is_relative_to(root) for root in roots)

    found = []
    for parent, dirs, files in os.walk(directory):  # links to directories are listed, not entered
        found += [f"{value} holds {Path(value) / Path(parent, name).relative_to(directory)}"
                  for name in sorted(dirs + files) if outside(Path(parent, name))]
    try:  # (read only where it lies under the roots: a link to a file outside is reported above)
        with RootedOpener(roots)(directory / SAVE_TO_DISK_MARKER) as handle:
            names = [entry["filename"] for entry in json.load(handle)["_data_files"]]
    except (OSError, ValueError, TypeError, KeyError):  # none, or not one datasets reads: the reader says so
        names = []
    found += [f"{value}/{SAVE_TO_DISK_MARKER} names {name}" for name in names if isinstance(name, str) and outside(directory / name)]
    return found
