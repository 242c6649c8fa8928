"""YAML for every file lorafusion reads (training configs, `plan` jobs and cost models): PyYAML's
safe loader, made strict where its defaults silently lose input or return something that cannot
be walked.

- A key repeated in one mapping is an error: PyYAML keeps the last one, so a config that says
  `lr:` twice would silently train with one of them. (Keys brought in by a `<<` merge may still
  be overridden, as YAML intends.)
- A document whose aliases expand to more than MAX_VALUES values, or that contains itself, is an
  error: PyYAML shares aliased nodes, so loading an "alias bomb" is instant, but validating,
  printing or planning with the result would never finish.

Errors are YAMLInputError (a ValueError) with a one-line message naming the file and line.
"""

from __future__ import annotations

import yaml

MAX_VALUES = 1_000_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YAMLInputError(ValueError):
    """A YAML file that cannot be used; the message names the file and, where known, the line."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first_line
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first_line[key]})", key_node.start_mark
                    )
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str):
    """The document in `text` (read from `source`, named in errors)."""
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise YAMLInputError(f"{source}: not valid YAML: {_one_line(error)}") from None
    except RecursionError:
        raise YAMLInputError(f"{source}: not valid YAML: nested too deeply") from None
    try:
        _check_size(document, source)
    except RecursionError:
        raise YAMLInputError(f"{source}: nested too deeply") from None
    return document


def _one_line(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        problem = error.problem or error.context or "invalid"
        if mark is not None:
            return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
        return problem
    return " ".join(str(error).split())


def _check_size(document, source: str) -> None:
    """Count the values `document` holds with aliases expanded, each shared node counted once per
    use; stop at MAX_VALUES or at a node that contains itself."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(value) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise YAMLInputError(f"{source}: a YAML alias refers to a node that contains it")
        open_nodes.add(key)
        total = 1
        for item in value.items() if isinstance(value, dict) else value:
            total += sum(size(part) for part in item) if isinstance(value, dict) else size(item)
            if total > MAX_VALUES:
                raise YAMLInputError(
                    f"{source}: expands to more than {MAX_VALUES:,} values through YAML aliases (&name / *name)"
                )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(document)
