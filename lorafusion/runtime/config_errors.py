"""Config problems as the user reads them: one line per problem, "key.path: reason", the reason
saying what was expected and what was given ("jobs[1].r: must be in 1..256, got 0").

Validators state a problem with `fail` (or `fail_at`, several places inside one value); pydantic's
own error types (a wrong type, a bound, an unknown or missing key) are worded here by `problem`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any, NoReturn

from pydantic import ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError


def fail(reason: str) -> NoReturn:
    """Refuse a value with `reason`, the whole line the user reads after the key path."""
    raise PydanticCustomError("config", "{reason}", {"reason": reason})


def fail_at(problems: list[tuple[tuple, str]], value: object) -> NoReturn:
    """Refuse several parts of a value at once, each at its place inside it (e.g. a mapping's keys; () for the value itself)."""
    line_errors = [{"type": PydanticCustomError("config", "{reason}", {"reason": reason}), "loc": loc, "input": value} for loc, reason in problems]
    raise ValidationError.from_exception_data("config", line_errors)


def describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return f"{_shortened(value)} ({type(value).__name__})" if isinstance(value, str) else _shortened(value)


def _shortened(value: object, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: the answer stays one readable line whatever was written."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


_REASONS = {
    "int_type": "must be an integer, got {described}",
    "float_type": "must be a number, got {described}",
    "finite_number": "must be a number, got {described}",
    "bool_type": "must be true or false, got {described}",
    "string_type": "must be a non-empty string, got {described}",
    "string_too_short": "must be a non-empty string, got {described}",
    "literal_error": "must be one of {choices}; got {described}",
    "greater_than": "must be > {gt}, got {value}",
    "greater_than_equal": "must be >= {ge}, got {value}",
    "less_than_equal": "must be <= {le}, got {value}",
    "dict_type": "must be a mapping, got {described}",
    "dataclass_type": "must be a mapping, got {described}",
    "model_type": "must be a mapping, got {described}",
    "tuple_type": "must be a list, got {described}",
    "list_type": "must be a list, got {described}",
    "too_short": "must not be empty",
}
_UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")
_MISSING = ("missing", "missing_keyword_only_argument", "missing_argument")
_ABSENT = object()


def problem(error: ErrorDetails, data: object, section_keys: Callable[[tuple], list[str] | None]) -> tuple[str, str]:
    """One pydantic error on `data` (the mapping as written) as (key path, reason). section_keys(loc)
    names the keys of the section holding loc[-1], or None outside the sections."""
    loc, kind = error["loc"], error["type"]
    known = section_keys(loc)
    if kind in _UNKNOWN_KEY or kind == "invalid_key" and known is not None:
        close = difflib.get_close_matches(str(loc[-1]), known or [], n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known or [])}"
        return key_path((*loc[:-1], str(loc[-1]))), f"unknown key; {hint}"
    if kind == "invalid_key":  # a free mapping's key, e.g. model.config's (they become keyword arguments)
        return key_path(loc[:-1]), f"keys must be strings, got {loc[-1]!r}"
    written = _written(data, loc)  # pydantic's input may be a number it read from a string
    if kind in _MISSING:
        return key_path(loc), "required, got null" if written is None else "required key is missing"
    if kind in _REASONS:
        ctx = {name: f"{value:g}" if isinstance(value, float) else value for name, value in (error.get("ctx") or {}).items()}
        choices = ", ".join(re.findall(r"'([^']*)'", ctx.get("expected", "")))  # a Literal's options, quoted
        value = error["input"] if written is _ABSENT else written
        return key_path(loc), _REASONS[kind].format(**ctx, choices=choices, value=value, described=describe(value))
    return key_path(loc), error["msg"]


def key_path(loc: tuple[Any, ...]) -> str:
    """("jobs", 1, "lora", "r") -> "jobs[1].lora.r"."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def _written(data: object, loc: tuple) -> object:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return _ABSENT
    return data
