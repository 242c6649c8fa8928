"""Multi-adapter fused LoRA op (both backends) against a per-segment float64 reference built from
the single-adapter reference: outputs and every gradient, mixed ranks, scalings and dropouts,
segment lengths including 0 and 1, adapters repeated and in shuffled order."""

from __future__ import annotations

import random

import pytest
import torch

from lorafusion.kernels import lora_linear_reference, torch_keep_mask
from lorafusion.kernels.keep_mask import triton_keep_mask
from lorafusion.kernels.lora_linear import fused_lora_linear
from lorafusion.kernels.multi_lora_linear import fused_multi_lora_linear
from lorafusion.kernels.segments import build_segment_meta, sample_dropout_rows
from lorafusion.kernels.utils import new_dropout_seed

DROPOUT_SEED = 321


def random_workload(num_adapters, in_features, out_features, seed, ranks=(1, 3, 8, 16, 17, 40), with_dropout=True):
    rng = random.Random(seed)
    adapter_ranks = [rng.choice(ranks) for _ in range(num_adapters)]
    scalings = [rng.choice([0.5, 1.0, 2.0, 8.0 / r]) for r in adapter_ranks]
    dropout_ps = [rng.choice([0.0, 0.1, 0.5]) if with_dropout else 0.0 for _ in range(num_adapters)]
    # Every adapter gets at least one segment, some two; lengths straddle the 64-row block size.
    segment_adapters = list(range(num_adapters)) + rng.sample(range(num_adapters), k=max(1, num_adapters // 2))
    rng.shuffle(segment_adapters)
    segment_lengths = [rng.choice([0, 1, 2, 7, 63, 64, 65, 100]) for _ in segment_adapters]
    return segment_adapters, segment_lengths, adapter_ranks, scalings, dropout_ps


def make_tensors(tokens, in_features, out_features, ranks, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = rand(tokens, in_features)
    weight = rand(out_features, in_features, scale=in_features**-0.5)
    bias = rand(out_features)
    lora_As = [rand(r, in_features, scale=in_features**-0.5) for r in ranks]
    lora_Bs = [rand(out_features, r, scale=r**-0.5) for r in ranks]
    grad_out = rand(tokens, out_features)
    return x, weight, bias, lora_As, lora_Bs, grad_out


def reference_keep(backend, meta, tokens, in_features):
    """The backend's keep-mask, per row with that row's adapter's p (None without dropout)."""
    if not meta.has_dropout:
        return None
    torch.manual_seed(DROPOUT_SEED)
    seed = int(new_dropout_seed())
    masks_by_p = {
        p: triton_keep_mask(seed, tokens, in_features, p, torch.device("cpu"))
        if backend == "triton"
        else torch_keep_mask(seed, (tokens, in_features), p, torch.device("cpu"))
        for p in set(meta.dropout_ps)
    }
    keep = torch.ones(tokens, in_features, dtype=torch.bool)
    for adapter, start, length in meta.segments:
        keep[start : start + length] = masks_by_p[meta.dropout_ps[adapter]][start : start + length]
    return keep


def per_segment_reference(x, weight, bias, lora_As, lora_Bs, meta, keep, grad_out):
    """float64 forward and gradients, each segment through the single-adapter reference."""
    x = x.double().requires_grad_()
    bias = bias.double().requires_grad_()
    As = [a.double().requires_grad_() for a in lora_As]
    Bs = [b.double().requires_grad_() for b in lora_Bs]
    outputs = []
    for adapter, start, length in meta.segments:
        rows = slice(start, start + length)
        outputs.append(
            lora_linear_reference(
                x[rows], weight.double(), bias, As[adapter], Bs[adapter], meta.scalings[adapter],
                None if keep is None else keep[rows], meta.dropout_ps[adapter],
            )
        )
    y = torch.cat(outputs)
    y.backward(grad_out.double())
    return y.detach(), x.grad, bias.grad, [a.grad for a in As], [b.grad for b in Bs]


def run_multi(x, weight, bias, lora_As, lora_Bs, meta, grad_out, backend):
    x = x.clone().requires_grad_()
    bias = bias.clone().requires_grad_()
    As = [a.clone().requires_grad_() for a in lora_As]
    Bs = [b.clone().requires_grad_() for b in lora_Bs]
    torch.manual_seed(DROPOUT_SEED)
    y = fused_multi_lora_linear(x, weight, bias, torch.cat(As), torch.cat(Bs, dim=1), meta, backend=backend)
    y.backward(grad_out)
    return y.detach(), x.grad, bias.grad, [a.grad for a in As], [b.grad for b in Bs]


def assert_close_to(name, got, exact, magnitude_rtol=2e-5):
    err = (got.double() - exact).abs().max().item() if exact.numel() else 0.0
    bound = magnitude_rtol * max(exact.abs().max().item() if exact.numel() else 0.0, 1.0)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("num_adapters", [1, 2, 4, 8, 32])
def test_matches_per_segment_reference(backend, num_adapters):
    in_features, out_features = 48, 40
    adapters, lengths, ranks, scalings, dropout_ps = random_workload(num_adapters, in_features, out_features, seed=num_adapters)
    meta = build_segment_meta(adapters, lengths, ranks, scalings, dropout_ps, "cpu")
    x, weight, bias, As, Bs, grad_out = make_tensors(meta.num_tokens, in_features, out_features, ranks, torch.float32)
    keep = reference_keep(backend, meta, meta.num_tokens, in_features)
    got = run_multi(x, weight, bias, As, Bs, meta, grad_out, backend)
    exact = per_segment_reference(x, weight, bias, As, Bs, meta, keep, grad_out)
    for name, g, e in zip(("y", "dx", "dbias"), got[:3], exact[:3]):
        assert_close_to(name, g, e)
    for a in range(num_adapters):
        assert_close_to(f"dA[{a}]", got[3][a], exact[3][a])
        assert_close_to(f"dB[{a}]", got[4][a], exact[4][a])


def test_heterogeneous_large_ranks_and_fp16():
    adapters, lengths, ranks, scalings, dropout_ps = [1, 0, 2, 1], [5, 70, 0, 33], [256, 2, 64], [0.25, 4.0, 1.0], [0.2, 0.0, 0.6]
    meta = build_segment_meta(adapters, lengths, ranks, scalings, dropout_ps, "cpu")
    x, weight, bias, As, Bs, grad_out = make_tensors(meta.num_tokens, 32, 24, ranks, torch.float16)
    keep = reference_keep("triton", meta, meta.num_tokens, 32)
    got = run_multi(x, weight, bias, As, Bs, meta, grad_out, "triton")
    exact = per_segment_reference(x, weight, bias, As, Bs, meta, keep, grad_out)
    for name, g, e in zip(("y", "dx"), got[:2], exact[:2]):
        assert_close_to(name, g, e, magnitude_rtol=4e-3)
    for a in (0, 1):  # adapter 2's only segment is empty
        assert_close_to(f"dA[{a}]", got[3][a], exact[3][a], magnitude_rtol=4e-3)
        assert_close_to(f"dB[{a}]", got[4][a], exact[4][a], magnitude_rtol=4e-3)
    assert torch.count_nonzero(got[3][2]) == 0 and torch.count_nonzero(got[4][2]) == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mixed_batch_gives_each_segment_what_its_adapter_alone_gives(backend):
    adapters, lengths, ranks, scalings, _ = random_workload(4, 40, 36, seed=11, with_dropout=False)
    meta = build_segment_meta(adapters, lengths, ranks, scalings, [0.0] * 4, "cpu")
    x, weight, bias, As, Bs, _ = make_tensors(meta.num_tokens, 40, 36, ranks, torch.float32)
    mixed = fused_multi_lora_linear(x, weight, bias, torch.cat(As), torch.cat(Bs, dim=1), meta, backend=backend)
    for adapter, start, length in meta.segments:
        rows = slice(start, start + length)
        alone = fused_lora_linear(x[rows], weight, bias, As[adapter], Bs[adapter], scalings[adapter], backend=backend)
        torch.testing.assert_close(mixed[rows], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dropout_mask_same_in_forward_and_backward_and_seeded(backend):
    meta = build_segment_meta([0, 1], [30, 30], [4, 4], [1.0, 1.0], [0.5, 0.5], "cpu")
    x, weight, bias, As, Bs, grad_out = make_tensors(60, 16, 12, [4, 4], torch.float32)
    first = run_multi(x, weight, bias, As, Bs, meta, grad_out, backend)
    again = run_multi(x, weight, bias, As, Bs, meta, grad_out, backend)
    assert all(torch.equal(a, b) for a, b in zip(first[:3], again[:3]))
    assert not torch.equal(first[0], per_segment_reference(x, weight, bias, As, Bs, meta, None, grad_out)[0].float())


def test_bad_segment_metadata():
    x, weight, bias, As, Bs, _ = make_tensors(10, 8, 6, [2], torch.float32)
    meta = build_segment_meta([0], [9], [2], [1.0], [0.0], "cpu")
    with pytest.raises(ValueError, match="segment lengths sum to 9 tokens but x holds 10"):
        fused_multi_lora_linear(x, weight, bias, As[0], Bs[0], meta, backend="torch")
    with pytest.raises(ValueError, match="adapter index 3 is outside 0..0"):
        build_segment_meta([3], [10], [2], [1.0], [0.0], "cpu")
    with pytest.raises(ValueError, match="rank must be in 0..256"):
        build_segment_meta([0], [10], [300], [1.0], [0.0], "cpu")
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        build_segment_meta([0], [10], [2], [1.0], [1.0], "cpu")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_adapters_on_an_fp16_base_and_in_place_output(backend):
    # Adapters kept in fp32 on a 16-bit base compute in fp16 and get fp32 gradients; the output
    # may be modified in place, as nn.Linear's may.
    adapters, lengths, ranks, scalings, dropout_ps = [0, 1, 0], [30, 41, 9], [4, 16], [2.0, 0.5], [0.25, 0.0]
    meta = build_segment_meta(adapters, lengths, ranks, scalings, dropout_ps, "cpu")
    x, weight, bias, As, Bs, grad_out = make_tensors(meta.num_tokens, 32, 24, ranks, torch.float16)
    As, Bs = [a.float() for a in As], [b.float() for b in Bs]
    keep = reference_keep(backend, meta, meta.num_tokens, 32)
    got = run_multi(x, weight, bias, As, Bs, meta, grad_out, backend)
    exact = per_segment_reference(x, weight, bias, As, Bs, meta, keep, grad_out)
    for name, g, e in zip(("y", "dx"), got[:2], exact[:2]):
        assert_close_to(name, g, e, magnitude_rtol=4e-3)
    for a in range(2):
        assert got[3][a].dtype == got[4][a].dtype == torch.float32
        assert_close_to(f"dA[{a}]", got[3][a], exact[3][a], magnitude_rtol=4e-3)
        assert_close_to(f"dB[{a}]", got[4][a], exact[4][a], magnitude_rtol=4e-3)
    A_cat = torch.cat(As).requires_grad_()
    y = fused_multi_lora_linear(x, weight, bias, A_cat, torch.cat(Bs, dim=1), meta, backend=backend)
    y += 1.0
    y.float().sum().backward()
    assert A_cat.grad is not None and A_cat.grad.dtype == torch.float32


@pytest.mark.parametrize("rows, cols", [(50, 70), (3, 5), (17, 129)])
def test_keyed_masks_are_the_same_bits_in_triton_and_torch(rows, cols):
    g = torch.Generator().manual_seed(rows)
    positions = torch.randint(0, 2**40, (rows,), generator=g)
    keys = torch.randint(-(2**63), 2**63 - 1, (rows,), generator=g)
    cpu = torch.device("cpu")
    for seed, p in ((7, 0.1), (2**31 - 2, 0.5)):
        triton_mask = triton_keep_mask(seed, rows, cols, p, cpu, row_positions=positions, row_keys=keys)
        assert torch.equal(triton_mask, torch_keep_mask(seed, (rows, cols), p, cpu, positions, keys))
        # A row's mask is its name's: rows permuted, masks permuted with them.
        order = torch.randperm(rows, generator=g)
        permuted = triton_keep_mask(seed, rows, cols, p, cpu, row_positions=positions[order], row_keys=keys[order])
        assert torch.equal(permuted, triton_mask[order])
    # Named by its row and key 0, a row draws the single-adapter kernels' mask (tl.randint4x's counter).
    by_row = torch_keep_mask(5, (rows, cols), 0.3, cpu, torch.arange(rows), torch.zeros(rows, dtype=torch.int64))
    assert torch.equal(by_row, torch_keep_mask(5, (rows, cols), 0.3, cpu))
    assert torch.equal(by_row, triton_keep_mask(5, rows, cols, 0.3, cpu))
    other_keys = torch_keep_mask(5, (rows, cols), 0.3, cpu, torch.arange(rows), torch.ones(rows, dtype=torch.int64))
    assert not torch.equal(by_row, other_keys)


def _packed(samples, order, ranks, scalings, dropout_ps):
    """The metadata of `samples` (adapter, length, key) packed in `order`, each token named by its
    sample's key and its position in the sample."""
    chosen = [samples[i] for i in order]
    rows = sample_dropout_rows([key for _, _, key in chosen], [length for _, length, _ in chosen], "cpu")
    return build_segment_meta(
        [a for a, _, _ in chosen], [length for _, length, _ in chosen], ranks, scalings, dropout_ps, "cpu", dropout_rows=rows
    )


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_sample_named_by_its_key_draws_the_same_dropout_wherever_it_is_packed(backend):
    # What makes a job train as if alone with dropout: its samples' masks follow them into any
    # microbatch, at any row, beside any other job's samples. Forward and every gradient against
    # the float64 reference with the keyed mask.
    ranks, scalings, dropout_ps = [4, 8], [2.0, 1.0], [0.5, 0.25]
    samples = [(0, 37, 11), (1, 70, -2**62), (0, 5, 3), (1, 64, 4)]  # (adapter, tokens, key)
    in_features, out_features = 24, 20
    x_all, weight, bias, As, Bs, grad_all = make_tensors(sum(n for _, n, _ in samples), in_features, out_features, ranks, torch.float32)
    starts = [sum(n for _, n, _ in samples[:i]) for i in range(len(samples))]

    def rows_of(order):
        return torch.cat([torch.arange(starts[i], starts[i] + samples[i][1]) for i in order])

    results = {}
    for order in ([0], [0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]):
        meta = _packed(samples, order, ranks, scalings, dropout_ps)
        index = rows_of(order)
        x, grad_out = x_all[index], grad_all[index]
        keep = torch_keep_mask(
            DROPOUT_SEED, (meta.num_tokens, in_features), meta.row_dropout_p(torch.device("cpu"))[:, None],
            torch.device("cpu"), meta.dropout_position, meta.dropout_key,
        )
        xg = x.clone().requires_grad_()
        A_cat, B_cat = torch.cat(As).requires_grad_(), torch.cat(Bs, dim=1).requires_grad_()
        y = fused_multi_lora_linear(xg, weight, bias, A_cat, B_cat, meta, backend=backend, dropout_seed=DROPOUT_SEED)
        y.backward(grad_out)
        exact = per_segment_reference(x, weight, bias, As, Bs, meta, keep, grad_out)
        assert_close_to("y", y.detach(), exact[0])
        assert_close_to("dx", xg.grad, exact[1])
        position = order.index(0)
        first = slice(sum(samples[i][1] for i in order[:position]), sum(samples[i][1] for i in order[: position + 1]))
        results[tuple(order)] = y.detach()[first], xg.grad[first]
    for order, (y0, dx0) in results.items():
        torch.testing.assert_close(y0, results[(0,)][0], rtol=1e-5, atol=1e-6, msg=str(order))
        torch.testing.assert_close(dx0, results[(0,)][1], rtol=1e-5, atol=1e-6, msg=str(order))


def test_dropout_rows_must_cover_the_tokens_in_int64():
    good = (torch.arange(10), torch.zeros(10, dtype=torch.int64))
    meta = build_segment_meta([0], [10], [2], [1.0], [0.5], torch.device("cpu"), dropout_rows=good)
    assert meta.dropout_key is good[1]
    with pytest.raises(ValueError, match=r"dropout_rows positions must be int64 \[10\] on cpu, got torch.int32 \[10\]"):
        build_segment_meta([0], [10], [2], [1.0], [0.5], "cpu", dropout_rows=(good[0].int(), good[1]))
    with pytest.raises(ValueError, match=r"dropout_rows keys must be int64 \[10\] on cpu, got torch.int64 \[9\]"):
        build_segment_meta([0], [10], [2], [1.0], [0.5], "cpu", dropout_rows=(good[0], good[1][:9]))
