"""The service's durable state: one SQLite database in the state directory holding the queue and
every job's state, progress and log lines. Every write is a committed transaction (synchronous
FULL) before the caller goes on, so whatever the API has answered survives a kill -9.

Job states: queued (accepted, not yet training) -> running -> finished | failed | cancelled.
A cancel request is recorded first (`cancel_requested`) and carried out by the trainer between
microbatches, so a kill between the two still ends with the job cancelled."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

DATABASE_FILE = "state.sqlite"
TERMINAL_STATES = ("finished", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT UNIQUE NOT NULL,
    spec TEXT NOT NULL,            -- the submitted job mapping (JSON), data paths resolved
    data_digest TEXT NOT NULL,     -- of its data at submission: a restart refuses changed data
    state TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    submitted_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    num_steps INTEGER,
    loss REAL,
    tokens INTEGER NOT NULL DEFAULT 0,
    tokens_per_s REAL,
    failure TEXT,
    adapter_dir TEXT,
    windows_waited INTEGER NOT NULL DEFAULT 0,  -- planning windows in a row left out (admission.py)
    eval_loss REAL                 -- at its latest eval (eval_data or eval_fraction)
);
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    at REAL NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_job ON logs (name, seq);
CREATE TABLE IF NOT EXISTS base (      -- the base-model settings of the first start: jobs' checkpoints need them
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (   -- one row per optimizer step, as lorafusion train's metrics.jsonl
    name TEXT NOT NULL,
    step INTEGER NOT NULL,
    at REAL NOT NULL,
    loss REAL,
    tokens INTEGER NOT NULL,       -- of this step's global batch
    lr REAL,
    tokens_per_s REAL,
    eval_loss REAL,                -- where the step was evaluated
    PRIMARY KEY (name, step)       -- a step redone after a restart replaces its row
);
"""

_PUBLIC_FIELDS = (
    "name", "state", "submitted_at", "started_at", "ended_at", "step", "num_steps", "loss", "tokens",
    "tokens_per_s", "eval_loss", "failure", "adapter_dir", "cancel_requested",
)


class DuplicateJob(Exception):
    """A job of that name was submitted before (names stay taken: they name the outputs)."""


class JobStore:
    """The database, shared by the HTTP threads and the trainer (one connection behind a lock)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.executescript(_SCHEMA)
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "windows_waited" not in columns:  # a state directory from before admission
            self._db.execute("ALTER TABLE jobs ADD COLUMN windows_waited INTEGER NOT NULL DEFAULT 0")
        if "eval_loss" not in columns:  # ... from before the service evaluated
            self._db.execute("ALTER TABLE jobs ADD COLUMN eval_loss REAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection, inside one transaction committed on leaving (rolled back on an error)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _write(self, statement: str, parameters: tuple = (), *more: tuple[str, tuple]) -> None:
        """Run the statement (and `more` (statement, parameters) pairs) as one committed transaction."""
        with self._transaction() as db:
            for each, values in ((statement, parameters), *more):
                db.execute(each, values)

    def _read(self, statement: str, parameters: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(statement, parameters).fetchall()

    # ---- the queue ------------------------------------------------------------------------------

    def add(self, name: str, spec: dict, data_digest: str) -> dict:
        """Accept a job (queued); raises DuplicateJob if the name was ever used."""
        now = time.time()
        try:
            self._write(
                "INSERT INTO jobs (name, spec, data_digest, state, submitted_at) VALUES (?, ?, ?, 'queued', ?)",
                (name, json.dumps(spec), data_digest, now),
                ("INSERT INTO logs (name, at, line) VALUES (?, ?, 'submitted')", (name, now)),
            )
        except sqlite3.IntegrityError:
            raise DuplicateJob(name) from None
        return self.get(name)

    def get(self, name: str) -> dict | None:
        rows = self._read("SELECT * FROM jobs WHERE name = ?", (name,))
        return _public(rows[0]) if rows else None

    def all(self) -> list[dict]:
        return [_public(row) for row in self._read("SELECT * FROM jobs ORDER BY seq")]

    def exists(self, name: str) -> bool:
        return bool(self._read("SELECT 1 FROM jobs WHERE name = ?", (name,)))

    def pending(self) -> list[tuple[str, dict, str, bool]]:
        """(name, spec, data digest, cancel requested) of every job not in a terminal state, in
        submission order: what the trainer has to (re)admit."""
        rows = self._read(
            "SELECT name, spec, data_digest, cancel_requested FROM jobs "
            f"WHERE state NOT IN {TERMINAL_STATES!r} ORDER BY seq"
        )
        return [(r["name"], json.loads(r["spec"]), r["data_digest"], bool(r["cancel_requested"])) for r in rows]

    def request_cancel(self, name: str) -> None:
        self._write(f"UPDATE jobs SET cancel_requested = 1 WHERE name = ? AND state NOT IN {TERMINAL_STATES!r}", (name,))

    # ---- the trainer's updates ------------------------------------------------------------------

    def started(self, name: str, num_steps: int, step: int) -> None:
        self._write(
            "UPDATE jobs SET state = 'running', started_at = COALESCE(started_at, ?), num_steps = ?, step = ? WHERE name = ?",
            (time.time(), num_steps, step, name),
        )

    def progress(self, name: str, step: int, loss: float, tokens: int, tokens_per_s: float,
                 batch_tokens: int, lr: float, eval_loss: float | None = None) -> None:  # fmt: skip
        """A job's optimizer step (`tokens`: all it has trained; `batch_tokens`: this step's) and its
        metrics row; `eval_loss` where the step was evaluated (the job keeps its last one)."""
        self._write(
            "UPDATE jobs SET step = ?, loss = ?, tokens = ?, tokens_per_s = ?, eval_loss = COALESCE(?, eval_loss) WHERE name = ?",
            (step, loss, tokens, tokens_per_s, eval_loss, name),
            ("INSERT OR REPLACE INTO metrics (name, step, at, loss, tokens, lr, tokens_per_s, eval_loss) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
             (name, step, time.time(), loss, batch_tokens, lr, tokens_per_s, eval_loss)),
        )

    def metrics(self, name: str) -> list[dict]:
        """The job's metrics rows by step ("eval_loss" only where it was evaluated)."""
        rows = self._read("SELECT step, at, loss, tokens, lr, tokens_per_s, eval_loss FROM metrics WHERE name = ? ORDER BY step", (name,))
        return [{key: row[key] for key in row.keys() if key != "eval_loss" or row[key] is not None} for row in rows]

    def ended(self, name: str, state: str, failure: str | None = None, adapter_dir: str | None = None) -> None:
        self._write(
            "UPDATE jobs SET state = ?, failure = ?, adapter_dir = ?, ended_at = ? WHERE name = ?",
            (state, failure, adapter_dir, time.time(), name),
        )

    def windows_waited(self) -> dict[str, int]:
        """Each job's count of planning windows in a row it was left out of, where not 0."""
        rows = self._read("SELECT name, windows_waited FROM jobs WHERE windows_waited > 0")
        return {row["name"]: row["windows_waited"] for row in rows}

    def set_windows_waited(self, counts: dict[str, int]) -> None:
        """The counts after a window (jobs not in `counts`: 0), in one transaction."""
        self._write(
            "UPDATE jobs SET windows_waited = 0 WHERE windows_waited > 0", (),
            *(("UPDATE jobs SET windows_waited = ? WHERE name = ?", (count, name)) for name, count in counts.items() if count),
        )

    def recorded_base(self) -> dict[str, str]:
        """The base-model settings this state directory was first served with ({} before the first
        start that loaded its base model, or in a state directory from before they were kept)."""
        return {row["key"]: row["value"] for row in self._read("SELECT key, value FROM base")}

    def record_base(self, settings: dict[str, str]) -> None:
        """Keep `settings` as the state directory's base, unless one was kept already: called once
        the base model was loaded with them (a start that failed before binds nothing)."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM base LIMIT 1").fetchone() is None:
                db.executemany("INSERT INTO base (key, value) VALUES (?, ?)", settings.items())

    # ---- logs -----------------------------------------------------------------------------------

    def log(self, name: str, line: str) -> None:
        self._write("INSERT INTO logs (name, at, line) VALUES (?, ?, ?)", (name, time.time(), line))

    def logs(self, name: str) -> list[dict]:
        rows = self._read("SELECT at, line FROM logs WHERE name = ? ORDER BY seq", (name,))
        return [{"at": row["at"], "line": row["line"]} for row in rows]


def _public(row: sqlite3.Row) -> dict:
    record = {key: row[key] for key in _PUBLIC_FIELDS}
    record["cancel_requested"] = bool(record["cancel_requested"])
    record["eta_s"] = _eta(record)
    return record


def _eta(record: dict) -> float | None:
    """Seconds left at the job's average pace since it first started (restarts included), for a running job."""
    if record["state"] != "running" or not record["num_steps"] or not record["step"] or not record["started_at"]:
        return None
    elapsed = time.time() - record["started_at"]
    return elapsed / record["step"] * (record["num_steps"] - record["step"])
