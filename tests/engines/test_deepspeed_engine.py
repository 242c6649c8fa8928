"""What only the DeepSpeed engine does (the tests shared with the megatron engine are in
test_pipeline_training.py): a non-finite loss stops the run on every rank with the same message."""

from __future__ import annotations

import pytest

from engines.test_pipeline_training import pipeline_config, torchrun

pytestmark = pytest.mark.multiprocess


def test_non_finite_values_stop_every_rank_with_the_same_message(tmp_path):
    config = pipeline_config(tmp_path, "deepspeed", "diverging")
    config["jobs"][0]["lr"] = 1e30  # "add" diverges after its first step
    result = torchrun(config, tmp_path, 2)
    assert result.returncode != 0
    messages = [line.split("RuntimeError: ", 1)[1] for line in result.stderr.splitlines() if "RuntimeError: job 'add'" in line]
    assert len(messages) == 2 and messages[0] == messages[1], result.stderr[-4000:]
    assert "non-finite" in messages[0] and "stop the run" in messages[0]
    assert not (tmp_path / "diverging" / "add" / "adapter_model.safetensors").exists()
