"""The LoRAM workflow on the command line: prune a saved tiny Llama (activation importance on a
calibration corpus), align the pruned model (its loss falls, the output is a pruned model
directory again), report memory, recover an adapter trained on the pruned model; errors exit 2."""

from __future__ import annotations

import json

import torch
import transformers

from lorafusion import LoRAConfig, apply_lora, save_adapter
from lorafusion.cli import main
from lorafusion.loram import PruneMap, load_pruned_model
from lorafusion.loram.align import align
from lorafusion.runtime.output_dir import LOCK_FILE, DirectoryLock


def original_model_and_corpus(tmp_path, sentence: str, records: int):
    """A tiny random Llama saved in tmp_path/original, and a text corpus of `records` lines; returns the corpus path."""
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=260, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "original")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": sentence * (1 + i % 3)}) + "\n" for i in range(records)))
    return corpus


def test_prune_align_report_recover(tmp_path, capsys):
    corpus = original_model_and_corpus(tmp_path, "the cat sat on the mat. ", 16)

    assert main(["loram", "prune", "--model", str(tmp_path / "original"), "--out", str(tmp_path / "pruned"),
                 "--ratio", "0.5", "--method", "activation", "--calibration", str(corpus), "--calibration-samples", "4"]) == 0
    out = capsys.readouterr().out
    assert "storage reduction (original bf16 / pruned NF4)" in out
    prune_map = PruneMap.load(tmp_path / "pruned")
    assert prune_map.method == "activation" and prune_map.keep_layers == (0, 2) and prune_map.is_pruned(1)

    losses = align(tmp_path / "pruned", corpus, tmp_path / "aligned", steps=8, lr=1e-2, tokens_per_step=128, checkpoint_every=4)
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0]
    assert PruneMap.load(tmp_path / "aligned") == prune_map
    aligned = load_pruned_model(tmp_path / "aligned")
    before = load_pruned_model(tmp_path / "pruned")
    assert not torch.equal(aligned.model.layers[1].mlp.down_proj.weight, before.model.layers[1].mlp.down_proj.weight)

    assert main(["loram", "report", "--model", str(tmp_path / "aligned")]) == 0
    assert "parameter reduction" in capsys.readouterr().out

    apply_lora(aligned, LoRAConfig(r=2, target_modules=["down_proj"], backend="torch"))
    save_adapter(aligned, tmp_path / "adapter")
    assert main(["loram", "recover", "--adapter", str(tmp_path / "adapter"), "--prune-map", str(tmp_path / "aligned"),
                 "--out", str(tmp_path / "recovered")]) == 0
    assert (tmp_path / "recovered" / "adapter_model.safetensors").is_file()

    assert main(["loram", "recover", "--adapter", str(tmp_path / "nowhere"), "--prune-map", str(tmp_path / "aligned"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "is not an adapter directory" in capsys.readouterr().err


def _snapshot(directory):
    """Every file's bytes, but the lock file, which lorafusion may leave beside them."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def test_prune_and_align_never_replace_or_delete_what_they_did_not_write(tmp_path, capsys):
    corpus = original_model_and_corpus(tmp_path, "the cat sat. ", 8)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (mine / "config.json").write_text('{"mine": true}')
    before = _snapshot(mine)
    prune = ["loram", "prune", "--model", str(tmp_path / "original"), "--ratio", "0.5"]
    align = ["loram", "align", "--model", str(tmp_path / "pruned"), "--data", str(corpus), "--steps", "2",
             "--tokens-per-step", "64", "--checkpoint-every", "1"]

    # A directory holding other files: refused, and left as it was.
    assert main(prune + ["--out", str(mine)]) == 2
    error = capsys.readouterr().err
    assert f"{mine} is not empty and was not written by lorafusion" in error and "--overwrite" in error
    # --overwrite writes beside them, but never over a file lorafusion did not write.
    assert main(prune + ["--out", str(mine), "--overwrite"]) == 2
    assert f"{mine / 'config.json'} was not written by lorafusion" in capsys.readouterr().err
    assert _snapshot(mine) == before

    assert main(prune + ["--out", str(tmp_path / "pruned")]) == 0
    assert main(align + ["--out", str(mine)]) == 2
    assert "not written by lorafusion" in capsys.readouterr().err
    assert _snapshot(mine) == before

    # An earlier output is replaced only with --overwrite, and files put beside it stay.
    (mine / "config.json").unlink()
    assert main(align + ["--out", str(mine), "--overwrite"]) == 0
    assert (mine / "notes.txt").read_text() == "precious"
    assert load_pruned_model(mine) is not None
    aligned = _snapshot(mine)
    assert main(align + ["--out", str(mine)]) == 2
    assert "holds an earlier lorafusion output; pass --overwrite" in capsys.readouterr().err
    assert _snapshot(mine) == aligned
    assert main(prune + ["--out", str(mine), "--overwrite", "--seed", "1"]) == 0
    assert (mine / "notes.txt").read_text() == "precious"
    assert load_pruned_model(mine) is not None
    with DirectoryLock(mine):  # as an align still writing there holds it
        assert main(align + ["--out", str(mine), "--overwrite"]) == 2
    assert f"{mine} is in use by another lorafusion process" in capsys.readouterr().err
