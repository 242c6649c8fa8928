"""The command line starts fast: help and argument errors import only what they need. Checked on
the modules a fresh interpreter imported (a timing would flake on a loaded machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "scipy", "deepspeed", "megatron", "triton")

PROBE = """
import json, sys
from lorafusion.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def imported_by(*argv: str) -> set[str]:
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["generate", "--help"], ["loram", "--help"], ["bogus"]])
def test_help_and_bad_commands_import_no_heavy_package(argv):
    assert not imported_by(*argv) & set(HEAVY)


def test_plan_help_imports_no_torch():
    # plan is numpy/scipy work (the scheduler package): never torch or an engine.
    assert not imported_by("plan", "--help") & {"torch", "transformers", "deepspeed", "megatron"}


def test_help_lists_every_command(capsys):
    from lorafusion.cli import SUBCOMMANDS, main

    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out
