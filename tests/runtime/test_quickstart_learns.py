"""The quickstart's claim, checked: its reverse job (the same data, hyperparameters and seed as in
examples/quickstart.yaml, trained alone so that the test stays within ~20 s of CPU) gets held-out
prompts right, which the random base model alone does not. Trained alone, the job computes what it
computes in the three-job run: packed samples never attend to each other, and its loss is
normalised per job."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import transformers

from lorafusion.cli import main
from lorafusion.runtime.config import load_config
from lorafusion.runtime.trainer import MultiJobTrainer

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def readme_accuracy(job: str) -> float:
    """The held-out accuracy the README's quickstart table states for `job`."""
    row = re.search(rf"^\| {job} \(\d+ steps\) \|.*?\| ([\d.]+)% \(", (REPO / "README.md").read_text(), re.M)
    assert row, f"no row for {job} in the README's quickstart table"
    return float(row.group(1)) / 100


@pytest.fixture(scope="module")
def reverse_run(tmp_path_factory):
    config = load_config(QUICKSTART)
    output = tmp_path_factory.mktemp("quickstart") / "run"
    config = dataclasses.replace(config, jobs=[j for j in config.jobs if j.name == "reverse"], output_dir=output)
    torch.set_num_threads(1)  # pytest -n 2 already keeps both cores busy
    result = MultiJobTrainer(config, device="cpu", progress=False).train()
    return config, output, result


def test_reverse_adapter_learns_what_the_base_does_not(reverse_run, capsys) -> None:
    config, output, result = reverse_run
    job = result.jobs["reverse"]
    assert job.status == "finished" and job.steps == 300
    assert job.truncated == 0
    assert job.first_loss > 5.0 and job.final_loss < 0.1
    assert job.eval_accuracy >= readme_accuracy("reverse") - 0.1

    eval_file = str(config.jobs[0].eval_data)
    assert main(["eval", eval_file, "--model", str(output / "base_model"), "--adapter", str(output / "reverse")]) == 0
    with_adapter = capsys.readouterr().out
    assert f"= {job.eval_accuracy:.1%}" in with_adapter  # the command scores as the run did
    assert main(["eval", eval_file, "--model", str(output / "base_model"), "--max-new-tokens", "8"]) == 0
    base_alone = capsys.readouterr().out.splitlines()[-1]
    assert base_alone.startswith("exact match: 0/200"), base_alone


def test_generate_prints_one_completion_per_prompt(reverse_run, tmp_path, capsys) -> None:
    _, output, _ = reverse_run
    model = ["--model", str(output / "base_model"), "--adapter", str(output / "reverse")]
    assert main(["generate", *model, "--prompt", "abc ->", "--prompt", "xqz ->"]) == 0
    assert capsys.readouterr().out.splitlines() == [" cba", " zqx"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "abc ->"}\n\n{"prompt": "xqz ->", "completion": "ignored"}\n{"prompt": "ab ->"}\n')
    assert main(["generate", *model, "--prompts", str(prompts)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [" cba", " zqx"] and len(lines) == 3


def test_greedy_batches_equal_single_prompts(reverse_run) -> None:
    """Prompts decoded together (grouped by length) complete exactly as each does alone."""
    from lorafusion.runtime.evaluation import greedy_completions, model_forward
    from lorafusion.runtime.tokenizer import load_tokenizer

    _, output, _ = reverse_run
    model = transformers.AutoModelForCausalLM.from_pretrained(output / "base_model").eval()
    tokenizer = load_tokenizer(output / "base_model")
    prompts = ["abc ->", "qwe ->", "a ->", "mnop ->", "zyx ->"]
    together = greedy_completions(model_forward(model), tokenizer, prompts, 6)
    alone = [greedy_completions(model_forward(model), tokenizer, [p], 6)[0] for p in prompts]
    assert together == alone
