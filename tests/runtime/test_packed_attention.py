"""The packed attention computes, for every supported architecture and every attention option it
passes (scaling, sliding window, logit softcap, grouped KV heads), what each sample computes alone
with the model's own eager attention; the kernel choice and the varlen kernels' plumbing
(cu_seqlens, window and GQA conventions) are checked on CPU against float64 references."""

from __future__ import annotations

import pytest
import torch
import transformers

from lorafusion.runtime import attention
from lorafusion.runtime.attention import AttentionOptions, attend_alone, attend_packed, choose_kernel, cu_seqlens
from lorafusion.runtime.config import ModelSpec, parse_config
from lorafusion.runtime.model import SUPPORTED_MODEL_TYPES, build_base_model

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64)
WINDOW = 4
# Every architecture with windows and softcaps small enough to change the result for these samples.
ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              {"head_dim": 8, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": WINDOW}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"head_dim": 8}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               {"head_dim": 8, "sliding_window": WINDOW, "attn_logit_softcapping": 0.5,
                "final_logit_softcapping": 2.0, "query_pre_attn_scalar": 20}),
}
SAMPLE_LENGTHS = (9, 3, 12)


def test_every_supported_architecture_is_tested():
    assert sorted(ARCHITECTURES) == sorted(SUPPORTED_MODEL_TYPES)


def _models(tmp_path, model_type):
    """The runtime's model (packed attention, built from a checkpoint) and the same checkpoint with
    transformers' eager attention, both in float64."""
    config_class, model_class, extra = ARCHITECTURES[model_type]
    torch.manual_seed(0)
    model_class(config_class(**TINY, **extra, initializer_range=0.3)).save_pretrained(tmp_path / "checkpoint")
    path = str(tmp_path / "checkpoint")
    packed = build_base_model(ModelSpec(path=path, architecture=None, config={})).to(torch.float64).eval()
    eager = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=torch.float64, attn_implementation="eager"
    ).eval()
    return packed, eager


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_packed_forward_equals_each_sample_alone_with_eager_attention(tmp_path, model_type):
    packed, eager = _models(tmp_path, model_type)
    windows = {getattr(layer.self_attn, "sliding_window", None) or getattr(packed.config, "sliding_window", None)
               for layer in packed.model.layers}
    if model_type in ("qwen2", "qwen3", "mistral", "gemma2"):
        assert WINDOW in windows and WINDOW < max(SAMPLE_LENGTHS)  # the window cuts into the longer samples
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (1, sum(SAMPLE_LENGTHS)))
    positions = torch.cat([torch.arange(n) for n in SAMPLE_LENGTHS])[None]
    with torch.no_grad():
        logits = packed(input_ids=ids, position_ids=positions, sample_lengths=SAMPLE_LENGTHS).logits
        start = 0
        for length in SAMPLE_LENGTHS:
            alone = eager(input_ids=ids[:, start : start + length]).logits
            # float64 throughout, but transformers' eager softmax rounds through fp32
            torch.testing.assert_close(logits[:, start : start + length], alone, rtol=1e-5, atol=1e-5)
            start += length


def test_packed_gradients_equal_the_samples_alone_with_softcap_and_window(tmp_path):
    packed, eager = _models(tmp_path, "gemma2")
    torch.manual_seed(2)
    ids = torch.randint(1, 64, (1, sum(SAMPLE_LENGTHS)))
    positions = torch.cat([torch.arange(n) for n in SAMPLE_LENGTHS])[None]
    weight = packed.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    (packed_grad,) = torch.autograd.grad(
        packed(input_ids=ids, position_ids=positions, sample_lengths=SAMPLE_LENGTHS).logits.square().sum(), weight
    )
    eager_weight = eager.model.layers[0].self_attn.q_proj.weight
    total, start = 0, 0
    for length in SAMPLE_LENGTHS:
        total = total + eager(input_ids=ids[:, start : start + length]).logits.square().sum()
        start += length
    (eager_grad,) = torch.autograd.grad(total, eager_weight)
    torch.testing.assert_close(packed_grad, eager_grad, rtol=1e-5, atol=1e-5)


def test_generation_with_a_kv_cache_keeps_the_window_and_softcap(tmp_path):
    """Without sample_lengths (generation, decoding one token at a time against a cache) the
    window and softcap still apply: the greedy continuation equals the eager model's."""
    packed, eager = _models(tmp_path, "gemma2")
    prompt = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    packed.config.use_cache = True
    packed_tokens = packed.generate(prompt, **settings, output_logits=True, return_dict_in_generate=True)
    eager_tokens = eager.generate(prompt, **settings, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(packed_tokens.sequences, eager_tokens.sequences)
    torch.testing.assert_close(torch.stack(packed_tokens.logits), torch.stack(eager_tokens.logits), rtol=1e-5, atol=1e-5)


def test_gemma2_jobs_trained_together_equal_each_job_alone(tmp_path):
    """The runtime packs samples of several jobs into one microbatch; with Gemma2's softcaps each job's
    adapter still ends as when its samples alone fill the same microbatches."""
    from lorafusion import multi_lora_modules
    from lorafusion.runtime.trainer import MultiJobTrainer
    from training_fixtures import config_dict

    torch.manual_seed(0)
    config = transformers.Gemma2Config(**dict(TINY, vocab_size=260), head_dim=8, sliding_window=24,
                                       attn_logit_softcapping=0.5, final_logit_softcapping=2.0, initializer_range=0.3)
    transformers.Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")

    def trained(jobs, output, schedule=None):
        data = config_dict(tmp_path, jobs=jobs, output=output)
        data["model"] = {"path": str(tmp_path / "gemma2")}
        trainer = MultiJobTrainer(parse_config(data, base_dir=tmp_path), progress=False)
        result = trainer.train(schedule=schedule)
        assert all(job.status == "finished" for job in result.jobs.values()), result.jobs
        return trainer

    def adapter(trainer, job):
        return {f"{name}.{m}": getattr(layer, m)[job].detach() for name, layer in multi_lora_modules(trainer.model).items()
                for m in ("lora_A", "lora_B") if job in layer.adapters}

    together = trained(("add", "rev"), "together")
    schedule = together.plan(resume=True)
    assert any(len({ref.job for ref in mb.samples}) > 1 for mb in schedule.microbatches)  # jobs really mixed
    for job in ("add", "rev"):
        alone = adapter(trained((job,), f"alone-{job}", schedule), job)
        mixed = adapter(together, job)
        assert alone.keys() == mixed.keys() and alone
        for key in alone:
            torch.testing.assert_close(mixed[key], alone[key], rtol=1e-5, atol=1e-6, msg=key)


# ---- one attention call against a float64 reference -----------------------------------------------


def _reference(query, key, value, options, num_keys_before=0):
    """Attention of one sequence in float64, written out: [batch, heads, queries, head_dim]."""
    query, key, value = (t.double() for t in (query, key, value))
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = options.scaling if options.scaling is not None else query.shape[-1] ** -0.5
    scores = query @ key.transpose(-1, -2) * scale
    if options.softcap is not None:
        scores = options.softcap * torch.tanh(scores / options.softcap)
    q = torch.arange(query.shape[2])[:, None] + num_keys_before
    k = torch.arange(key.shape[2])[None]
    allowed = (k <= q) & ((k > q - options.sliding_window) if options.sliding_window else True)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ value


OPTION_CASES = [
    AttentionOptions(),
    AttentionOptions(scaling=0.2),
    AttentionOptions(sliding_window=3),
    AttentionOptions(softcap=0.7, scaling=0.5),
    AttentionOptions(softcap=0.7, sliding_window=5),
    AttentionOptions(sliding_window=50),  # longer than every sample: no window
]


def _qkv(tokens, heads=4, kv_heads=2, head_dim=8, batch=1, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, h, tokens, head_dim, generator=generator, dtype=dtype) * 2 for h in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize("options", OPTION_CASES, ids=str)
def test_per_sample_kernel_equals_the_reference(options):
    query, key, value = _qkv(sum(SAMPLE_LENGTHS))
    output = attend_packed(query, key, value, SAMPLE_LENGTHS, options, kernel="per_sample")
    start = 0
    for length in SAMPLE_LENGTHS:
        span = slice(start, start + length)
        expected = _reference(query[:, :, span], key[:, :, span], value[:, :, span], options)
        torch.testing.assert_close(output[:, span].transpose(1, 2).double(), expected, rtol=1e-5, atol=1e-5)
        start += length


@pytest.mark.parametrize("options", OPTION_CASES, ids=str)
def test_queries_at_the_end_of_longer_keys(options):
    """A KV cache: 3 new queries against 10 keys, and one query against 10."""
    for num_queries in (3, 1):
        query, _, _ = _qkv(num_queries, batch=2, seed=4)
        _, key, value = _qkv(10, batch=2, seed=5)
        expected = _reference(query, key, value, options, num_keys_before=10 - num_queries)
        torch.testing.assert_close(attend_alone(query, key, value, options).double(), expected, rtol=1e-5, atol=1e-5)


def test_window_and_softcap_change_the_result():
    """The references above would pass an attention that ignored the options only if they did not matter."""
    query, key, value = _qkv(12)
    plain = attend_alone(query, key, value, AttentionOptions())
    for options in (AttentionOptions(sliding_window=3), AttentionOptions(softcap=0.7)):
        assert (attend_alone(query, key, value, options) - plain).abs().max() > 0.1


def test_packed_attention_refuses_sinks_and_bidirectional_modules():
    query, key, value = _qkv(4)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="attention sinks"):
        attention.packed_attention(module, query, key, value, None, sample_lengths=(4,), s_aux=torch.zeros(4))
    module.is_causal = False
    with pytest.raises(ValueError, match="bidirectional"):
        attention.packed_attention(module, query, key, value, None, sample_lengths=(4,))


def test_sample_lengths_must_cover_the_microbatch():
    query, key, value = _qkv(10)
    with pytest.raises(ValueError, match="sum to 9 but the microbatch has 10 tokens"):
        attend_packed(query, key, value, (4, 5), AttentionOptions())


# ---- kernel choice and the varlen kernels' plumbing --------------------------------------------


def test_cu_seqlens_are_int32_offsets_built_once_per_microbatch():
    offsets = cu_seqlens((3, 5, 2), torch.device("cpu"))
    assert offsets.dtype == torch.int32 and offsets.tolist() == [0, 3, 8, 10]
    assert cu_seqlens((3, 5, 2), torch.device("cpu")) is offsets  # every later layer reuses it
    assert cu_seqlens((3, 5, 3), torch.device("cpu")) is not offsets


@pytest.mark.parametrize(
    "on_cuda, batch, dtype, head_dim, options, flash, torch_varlen, expected",
    [
        (False, 1, torch.bfloat16, 64, AttentionOptions(), True, True, "per_sample"),
        (True, 1, torch.float32, 64, AttentionOptions(), True, True, "per_sample"),
        (True, 2, torch.bfloat16, 64, AttentionOptions(), True, True, "per_sample"),
        (True, 1, torch.bfloat16, 512, AttentionOptions(), True, True, "per_sample"),
        (True, 1, torch.bfloat16, 36, AttentionOptions(), True, True, "per_sample"),
        (True, 1, torch.bfloat16, 128, AttentionOptions(softcap=50.0, dropout=0.1), True, True, "flash_attn"),
        (True, 1, torch.float16, 64, AttentionOptions(sliding_window=8), False, True, "torch_varlen"),
        (True, 1, torch.bfloat16, 64, AttentionOptions(softcap=50.0), False, True, "per_sample"),
        (True, 1, torch.bfloat16, 64, AttentionOptions(dropout=0.1), False, True, "per_sample"),
        (True, 1, torch.bfloat16, 64, AttentionOptions(), False, False, "per_sample"),
    ],
)
def test_kernel_choice(on_cuda, batch, dtype, head_dim, options, flash, torch_varlen, expected):
    assert choose_kernel(on_cuda, batch, dtype, head_dim, options, has_flash_attn=flash, has_torch_varlen=torch_varlen) == expected


def test_cpu_tensors_use_the_per_sample_kernel():
    query, key, _ = _qkv(8, dtype=torch.bfloat16)
    assert attention.select_kernel(query, key, AttentionOptions()) == "per_sample"


def _flash_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, causal, window_size, softcap):
    """flash-attn's varlen convention written out: [tokens, heads, head_dim] tensors, window_size =
    (keys left of the query, keys right of it), -1 unbounded; softcap 0 = none."""
    assert causal and window_size[1] == 0 and cu_q is cu_k and max_q == max_k
    assert window_size[0] == -1 or window_size[0] + 1 < max_q  # a window no sample fills is passed as none
    bounds = cu_q.tolist()
    assert max(b - a for a, b in zip(bounds, bounds[1:])) == max_q
    outputs = []
    for start, end in zip(bounds, bounds[1:]):
        options = AttentionOptions(
            scaling=scale, sliding_window=window_size[0] + 1 if window_size[0] >= 0 else None, softcap=softcap or None
        )
        one = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        outputs.append(_reference(*one, options)[0].transpose(0, 1))
    return torch.cat(outputs).to(q.dtype)


@pytest.mark.parametrize("options", OPTION_CASES, ids=str)
def test_flash_attn_kernel_passes_offsets_window_and_softcap_in_its_convention(monkeypatch, options):
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size, softcap):
        assert dropout_p == 0.0 and k.shape[1] == 2  # flash-attn takes grouped KV heads as they are
        return _flash_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale=softmax_scale, causal=causal,
                                       window_size=window_size, softcap=softcap)

    monkeypatch.setattr(attention, "_flash_attn_varlen", lambda: flash_attn_varlen_func)
    query, key, value = _qkv(sum(SAMPLE_LENGTHS), seed=6)
    expected = attend_packed(query, key, value, SAMPLE_LENGTHS, options, kernel="per_sample")
    output = attend_packed(query, key, value, SAMPLE_LENGTHS, options, kernel="flash_attn")
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("takes_gqa", [True, False])
@pytest.mark.parametrize("options", [o for o in OPTION_CASES if o.softcap is None], ids=str)
def test_torch_varlen_kernel_passes_offsets_window_and_grouped_heads(monkeypatch, options, takes_gqa):
    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa=False):
        assert enable_gqa == takes_gqa and (k.shape[1] == 2) == takes_gqa  # else the heads come expanded
        assert window_size == (-1, 0) or window_size[0] >= 0
        return _flash_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, causal=True,
                                       window_size=window_size, softcap=0.0)

    monkeypatch.setattr(attention, "_torch_varlen", lambda device_index: (varlen_attn, takes_gqa))
    query, key, value = _qkv(sum(SAMPLE_LENGTHS), seed=7)
    expected = attend_packed(query, key, value, SAMPLE_LENGTHS, options, kernel="per_sample")
    output = attend_packed(query, key, value, SAMPLE_LENGTHS, options, kernel="torch_varlen")
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("takes_gqa", [True, False])
def test_the_installed_torch_varlen_attn_takes_our_call(monkeypatch, takes_gqa):
    """torch's own varlen_attn, on meta tensors (its fake kernels: shapes, dtypes and arguments checked,
    no GPU needed), forward and backward; without enable_gqa (torch before 2.12) the KV heads come expanded."""
    varlen = pytest.importorskip("torch.nn.attention.varlen").varlen_attn

    def without_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size):
        return varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)

    monkeypatch.setattr(attention, "_torch_varlen", lambda device_index: (varlen, True) if takes_gqa else (without_gqa, False))
    query, key, value = (torch.empty(1, h, 12, 64, device="meta", dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))
    output = attend_packed(query, key, value, (5, 7), AttentionOptions(scaling=0.1, sliding_window=3), kernel="torch_varlen")
    assert output.shape == (1, 12, 4, 64) and output.dtype == torch.bfloat16
    output.sum().backward()
    assert query.grad.shape == query.shape and key.grad.shape == key.shape and value.grad.shape == value.shape


def test_torch_varlen_kernel_refuses_softcap_and_dropout(monkeypatch):
    monkeypatch.setattr(attention, "_torch_varlen", lambda device_index: (None, True))
    query, key, value = _qkv(6)
    for options in (AttentionOptions(softcap=1.0), AttentionOptions(dropout=0.1)):
        with pytest.raises(ValueError, match="neither a logit softcap nor attention dropout"):
            attend_packed(query, key, value, (6,), options, kernel="torch_varlen")


def test_unknown_kernel_is_named():
    query, key, value = _qkv(6)
    with pytest.raises(ValueError, match="kernel 'fast' is not one of per_sample, flash_attn, torch_varlen"):
        attend_packed(query, key, value, (6,), AttentionOptions(), kernel="fast")
