"""The README starts with exactly two set-up commands, the main job on the base install and the
test command, and CI runs the same test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_set_up_commands_and_ci_agree():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    main_job, tests = blocks[0].strip(), blocks[1].strip()
    assert main_job == "pip install torch==2.13.0 && pip install -e . && lorafusion train examples/quickstart.yaml"
    assert tests == 'pip install -e ".[dev]" && python -m pytest -n 2'
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[dev]"' in ci
    assert ci.rstrip().endswith("python -m pytest -n 2")
