"""`lorafusion eval` and `lorafusion generate --prompts`: a bad prompts file gets exit code 2 and
one line naming the file and, for a bad record, its line; nothing is loaded before the file is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafusion.cli import main

CASES = [
    # (name, file content or None for a missing file, needs completions, expected fragments)
    ("missing-file", None, True, ["nope.jsonl", "cannot read"]),
    ("empty", "\n\n", True, ["no records"]),
    ("bad-json", '{"prompt": "a", "completion": "b"}\n{"prompt": \n', True, ["line 2", "invalid JSON"]),
    ("not-object", '["a", "b"]\n', True, ["line 1", "JSON object"]),
    ("no-completion", '{"prompt": "a"}\n', True, ["line 1", 'missing field "completion"']),
    ("number-prompt", '{"prompt": 3, "completion": "b"}\n', True, ["line 1", '"prompt" must be a string']),
    ("no-prompt", '{"text": "a"}\n', False, ["line 1", 'missing field "prompt"']),
    ("bad-utf8", b'{"prompt": "\xff"}\n', False, ["not valid UTF-8"]),
]


@pytest.mark.parametrize("name, content, for_eval, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_prompt_file(tmp_path: Path, capsys, name, content, for_eval, fragments) -> None:
    path = tmp_path / "nope.jsonl"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    model = ["--model", str(tmp_path / "model")]
    argv = ["eval", str(path), *model] if for_eval else ["generate", *model, "--prompts", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"lorafusion {argv[0]}: error: "), err
    assert str(path) in err
    for fragment in fragments:
        assert fragment in err, err


def test_eval_names_missing_model_after_reading_data(tmp_path: Path, capsys) -> None:
    data = tmp_path / "eval.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    assert main(["eval", str(data), "--model", str(tmp_path / "nomodel")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "not found" in err


def test_generate_takes_prompt_or_prompts_not_both(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(tmp_path), "--prompt", "x", "--prompts", "p.jsonl"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
