"""Under torchrun the output_dir rules hold on every rank: a refused directory stops each rank
with the same one-line message (no traceback), and nothing is written into it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from training_fixtures import config_dict

pytestmark = pytest.mark.multiprocess


def test_a_foreign_output_dir_is_refused_on_every_rank(tmp_path):
    config = config_dict(tmp_path, jobs=("add",), output="run")
    config["parallel"] = {"engine": "megatron", "pipeline_stages": 2}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    out.mkdir()
    (out / "data.csv").write_text("1,2\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lorafusion.train", str(path), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert result.returncode != 0
    message = f"lorafusion train: {out} is not empty and was not written by lorafusion"
    assert result.stderr.count(message) == 2, result.stderr[-4000:]
    assert "Error:" not in result.stderr.split("ChildFailedError")[0], result.stderr[-4000:]  # torchrun's own report aside
    assert sorted(p.name for p in out.iterdir()) == ["data.csv"]
