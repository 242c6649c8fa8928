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


def test_prune_align_report_recover(tmp_path, capsys):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=260, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "original")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": "the cat sat on the mat. " * (1 + i % 3)}) + "\n" for i in range(16)))

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
