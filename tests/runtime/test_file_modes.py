"""A run's outputs follow the umask, as any file the user writes: no 0600 adapter or 0700
directory because a temporary file was renamed into place."""

from __future__ import annotations

import os
import stat

import pytest
import yaml
from torch import nn

from lorafusion.adapters import save_adapter
from lorafusion.apply import apply_lora
from lorafusion.cli import main
from lorafusion.config import LoRAConfig
from training_fixtures import config_dict


@pytest.fixture
def umask():
    def set_umask(mask: int) -> int:
        os.umask(mask)
        return mask

    previous = os.umask(0o022)
    yield set_umask
    os.umask(previous)


def modes(root):
    found = {}
    for path in [root, *root.rglob("*")]:
        mode = os.lstat(path).st_mode
        found[str(path.relative_to(root))] = (stat.S_ISDIR(mode), stat.S_IMODE(mode))
    return found


def test_run_outputs_follow_the_umask(tmp_path, umask):
    mask = umask(0o027)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_dict(tmp_path, jobs=("add",), add={"max_steps": 2})))
    assert main(["train", str(config), "--no-progress"]) == 0
    found = modes(tmp_path / "run")
    assert "add/adapter_model.safetensors" in found and "base_model/model.safetensors" in found
    wrong = {name: oct(mode) for name, (is_dir, mode) in found.items() if mode != (0o777 if is_dir else 0o666) & ~mask}
    assert not wrong


def test_save_adapter_follows_the_umask(tmp_path, umask):
    mask = umask(0o002)
    model = nn.Sequential(nn.Linear(8, 8))
    apply_lora(model, LoRAConfig(r=2, target_modules=["0"], backend="torch"))
    save_adapter(model, tmp_path / "adapter")
    found = modes(tmp_path / "adapter")
    assert found["."] == (True, 0o775)
    assert {mode for name, (is_dir, mode) in found.items() if not is_dir} == {0o666 & ~mask}
