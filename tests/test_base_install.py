"""The main job needs only `pip install -e .`: a training run with `parallel.engine: none` works
without the `pipeline` and `dev` extras, and imports neither DeepSpeed nor megatron-core even
where they are installed (no "Setting accelerator to CPU" warning, no seconds spent importing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from training_fixtures import config_dict

# Top-level modules of the `pipeline`, `data` and `dev` extras (and accelerate, which peft brings).
EXTRAS = ("deepspeed", "megatron", "peft", "accelerate", "pytest", "hypothesis", "xdist", "pytest_benchmark", "datasets", "pyarrow")

# Runs the CLI with `hidden` made uninstalled: every import finder answers "not found" for them, as
# in an environment without the extras; prints the top-level modules imported, as JSON, last.
RUN = """
import json, sys
hidden = set(json.loads(sys.argv[1]))

class Hidden:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, name):
        return getattr(self.finder, name)

sys.meta_path[:] = [Hidden(finder) if hasattr(finder, "find_spec") else finder for finder in sys.meta_path]
for name in list(sys.modules):
    if name.split(".")[0] in hidden:
        del sys.modules[name]
from lorafusion.cli import main
code = main(sys.argv[2:])
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
sys.exit(code)
"""


def train(tmp_path: Path, hidden: tuple[str, ...]) -> tuple[subprocess.CompletedProcess, set[str]]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_dict(tmp_path, jobs=("add", "txt"), add={"max_steps": 2}, txt={"max_steps": 2})))
    result = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(hidden), "train", str(config), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result, set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_training_runs_without_the_extras(tmp_path):
    result, imported = train(tmp_path, EXTRAS)
    assert not imported & set(EXTRAS)
    assert (tmp_path / "run" / "add" / "adapter_model.safetensors").is_file()
    assert "microbatches" in result.stdout  # the closing summary, also with --no-progress
    # The inline base model and its byte tokenizer load with plain transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "run" / "base_model"
    AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    assert AutoTokenizer.from_pretrained(base, local_files_only=True)("1+1=")["input_ids"] == [257, 49, 43, 49, 61]


def test_training_with_the_extras_installed_imports_no_engine(tmp_path):
    result, imported = train(tmp_path, ())
    assert not imported & {"deepspeed", "megatron"}
    assert "Setting accelerator" not in result.stdout + result.stderr
