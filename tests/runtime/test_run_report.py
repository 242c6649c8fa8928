"""The closing summary's per-job report: samples cut by max_seq_len (warned once at the start,
counted at the end), first and last loss, eval accuracy on eval_data, and a bad eval_data record
stopping its job before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafusion.runtime.trainer import MultiJobTrainer
from training_fixtures import make_config


def test_truncated_samples_warned_and_counted(tmp_path: Path, capsys) -> None:
    # "rev" samples are [bos] + prompt + completion + [eos], 7 to 15 tokens: max_seq_len 9 cuts the longer ones.
    config = make_config(tmp_path, jobs=("add", "rev"), rev={"max_seq_len": 9}, add={"max_steps": 2}, checkpoint_every=0)
    trainer = MultiJobTrainer(config, device="cpu", progress=False)
    cut = sum(1 for s in trainer.jobs["rev"].samples if len(s.input_ids) == 9 and s.input_ids[-1] != 258)
    assert 0 < cut < len(trainer.jobs["rev"].samples)
    result = trainer.train()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorafusion")]  # not transformers' bars
    assert err == [f"lorafusion train: warning: samples truncated by max_seq_len: rev {cut} of 40 (max_seq_len=9)"]
    assert result.jobs["rev"].truncated == cut and result.jobs["add"].truncated == 0
    first = {json.loads(line)["job"]: json.loads(line)["loss"] for line in reversed((config.output_dir / "metrics.jsonl").read_text().splitlines())}
    assert result.jobs["add"].first_loss == first["add"] and result.jobs["add"].tokens_per_s > 0


def test_eval_accuracy_in_the_result(tmp_path: Path) -> None:
    config = make_config(tmp_path, jobs=("add",), checkpoint_every=0)
    records = [json.loads(line) for line in Path(config.jobs[0].data).read_text().splitlines()[:5]]
    eval_file = tmp_path / "add_eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    import dataclasses

    config = dataclasses.replace(config, jobs=[dataclasses.replace(config.jobs[0], eval_data=eval_file)])
    result = MultiJobTrainer(config, device="cpu", progress=False).train()
    # Four steps of a tiny model learn nothing: the point is that a score in [0, 1] is reported.
    assert 0.0 <= result.jobs["add"].eval_accuracy <= 1.0


def test_bad_eval_data_stops_its_job_before_training(tmp_path: Path) -> None:
    import dataclasses

    config = make_config(tmp_path, jobs=("add", "txt"), checkpoint_every=0)
    eval_file = tmp_path / "bad_eval.jsonl"
    eval_file.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2="}\n')
    alone = dataclasses.replace(config, jobs=[dataclasses.replace(config.jobs[0], eval_data=eval_file)])
    with pytest.raises(ValueError, match=r"no job can train: job 'add': .*bad_eval.jsonl, line 2: missing field \"completion\""):
        MultiJobTrainer(alone, device="cpu", progress=False)
    assert not (config.output_dir / "metrics.jsonl").exists()
    both = dataclasses.replace(config, jobs=[alone.jobs[0], config.jobs[1]])
    result = MultiJobTrainer(both, device="cpu", progress=False).train()
    assert result.jobs["add"].status == "failed" and "bad_eval.jsonl, line 2" in result.jobs["add"].failure
    assert result.jobs["txt"].status == "finished" and result.jobs["add"].steps == 0
