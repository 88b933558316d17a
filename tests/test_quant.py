"""INT4 packing, quantization and the int4 modules, against independent plain references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma3_int4 import cpu_kernels, quant
from gemma3_int4.quant import GROUP_SIZE, Int4Linear, Int8Linear


def reference_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Byte by byte: element 2j is the low nibble, 2j+1 the high one, both two's complement."""
    out = []
    for row in packed.view(torch.uint8).tolist():
        values = []
        for byte in row:
            for nibble in (byte & 0xF, byte >> 4):
                values.append(nibble - 16 if nibble >= 8 else nibble)
        out.append(values)
    return torch.tensor(out, dtype=torch.int8)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(n, half_k, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, 2 * half_k), generator=g, dtype=torch.int8)
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (n, half_k)
    assert torch.equal(quant.unpack_int4(packed), q)
    assert torch.equal(reference_unpack(packed), q)


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=1, max_size=64))
def test_unpack_every_byte(data):
    packed = torch.frombuffer(bytearray(data), dtype=torch.int8).view(1, -1)
    assert torch.equal(quant.unpack_int4(packed), reference_unpack(packed))
    assert torch.equal(quant.pack_int4(quant.unpack_int4(packed)), packed)


def test_odd_k_cannot_be_packed():
    with pytest.raises(ValueError, match="odd number"):
        quant.pack_int4(torch.zeros(2, 3))


def test_quantize_is_round_to_nearest():
    w = torch.randn(16, 4 * GROUP_SIZE)
    w[3, :GROUP_SIZE] = 0.0  # an all-zero group
    data, scales = quant.quantize_int4(w)
    assert data.shape == (16, 2 * GROUP_SIZE) and scales.shape == (16, 4) and scales.dtype == torch.bfloat16
    err = (quant.dequantize_int4(data, scales.float()) - w).abs().unflatten(-1, (-1, GROUP_SIZE))
    assert (err <= scales.float()[..., None] / 2 + 1e-7).all()
    assert torch.equal(quant.dequantize_int4(data, scales.float())[3, :GROUP_SIZE], torch.zeros(GROUP_SIZE))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_quantize_recovers_weights_on_the_grid(seed):
    """A weight that is exactly q * scale (bf16 scale, |q| <= 7) quantizes back losslessly, also the groups whose
    largest |q| is below 7 (QAT checkpoints have them)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(2, 8, (8, 2, 1), generator=g)  # each group's largest |q| (1: see the next test)
    q = (torch.rand(8, 2, GROUP_SIZE, generator=g) * (2 * m + 1) - m - 0.5).round().clamp(-m, m)
    q[:, :, 0] = m[..., 0] * torch.where(torch.rand(8, 2, generator=g) < 0.5, -1, 1)
    q[:, :, 1] = 1  # so that no coarser grid fits the group: the scale is unique
    q[0, 0, 0] = m[0, 0, 0] = 7  # as in any QAT tensor, some groups use the whole grid
    q = q.flatten(1).to(torch.int8)
    scales = (torch.rand(8, 2, generator=g) + 0.01).to(torch.bfloat16)
    w = quant.dequantize_int4(quant.pack_int4(q), scales.float())
    data, got_scales = quant.quantize_int4(w)
    assert torch.equal(got_scales, scales)
    assert torch.equal(quant.unpack_int4(data), q)


def test_quantize_keeps_the_7_grid_when_two_fit():
    """q in {0, +-1} on scale s is also q in {0, +-7} on s / 7: the 7-grid wins, as QAT and RTN make such groups
    (a single non-zero weight, say): RTN -> bf16 -> quantize gives back the same int4."""
    w = torch.zeros(2, GROUP_SIZE)
    w[0, 5], w[1, :3] = 0.3, torch.tensor([0.2, -0.2, 0.2])
    data, scales = quant.quantize_int4(w)
    assert (quant.unpack_int4(data).abs().amax(-1) == 7).all()
    again = quant.quantize_int4(quant.dequantize_int4(data, scales).to(torch.bfloat16))
    assert torch.equal(again[0], data) and torch.equal(again[1], scales)


def test_asymmetric_quantization():
    """A zero point per group: no worse than symmetric rounding on centred weights and far better on shifted ones;
    narrowing a group's range lowers its error where outliers stretch it, and refitting the scale (and zero) by
    least squares lowers it again; integer zero points are exact multiples
    of their scales (AWQ's form); a constant group is exact."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) / 20
    w[:, 5] *= 8  # an outlier in the first group of each row
    shifted = w + torch.rand(64, 1, generator=g) / 10

    def error(weight, integer=False):
        data, scales, zeros = quant.quantize_int4_asymmetric(weight, integer)
        assert scales.dtype == torch.bfloat16 and zeros.dtype == torch.float32 and data.shape == (64, 128)
        return (quant.dequantize_int4(data, scales.float(), zeros) - weight).square().sum().item()

    def symmetric(weight):
        return (quant.dequantize_int4(*quant.quantize_int4(weight)).float() - weight).square().sum().item()

    assert error(w) < symmetric(w) and error(shifted) < symmetric(shifted) / 2
    assert error(shifted, integer=True) < symmetric(shifted) / 2
    with pytest.MonkeyPatch.context() as m:
        m.setattr(quant, "least_squares_grid", lambda groups, scales, zeros, integer, weights: (scales, zeros))
        clipped = error(w), error(shifted, integer=True)  # the narrowed ranges alone, no least-squares refit
        m.setattr(quant, "CLIP_RATIOS", (1.0,))  # the whole range: plain asymmetric rounding
        whole_range = error(w)
    assert clipped[0] < 0.95 * whole_range
    assert error(w) < 0.95 * clipped[0] and error(shifted, integer=True) < 0.98 * clipped[1]
    _, scales, zeros = quant.quantize_int4_asymmetric(shifted, integer_zero_points=True)
    zp = 8 - zeros / scales.float()
    assert torch.equal(zp, zp.round()) and bool(((zp >= 0) & (zp <= 15)).all())
    for integer in (False, True):  # an all-zero group (a padded row) stays zero
        data, scales, zeros = quant.quantize_int4_asymmetric(torch.zeros(4, 32), integer)
        assert not quant.dequantize_int4(data, scales.float(), zeros).any()


def test_quantize_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize_int4(torch.randn(4, 48))
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize_int4(torch.randn(64))


def random_int4_linear(n=48, k=128, dtype=torch.float32) -> Int4Linear:
    layer = Int4Linear(k, n, dtype=dtype)
    layer.int4_data, scales = quant.quantize_int4(torch.randn(n, k))
    layer.scales = scales.to(dtype)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_is_the_matmul_of_its_grid(dtype):
    """Against W = q * scale built from the integers and scales directly (not through our dequantization)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (48, 128), generator=g)
    scales = (torch.rand(48, 4, generator=g) + 0.5).to(dtype)
    w = (q.float().view(48, 4, 32) * scales.float()[..., None]).view(48, 128)  # exact: 4-bit ints times a scale
    layer = Int4Linear(128, 48, dtype=dtype)
    layer.load_state_dict({"int4_data": quant.pack_int4(q), "scales": scales})
    x = torch.randn(3, 5, 128, dtype=dtype)
    dt = cpu_kernels.matmul_dtype(x)  # float32 on CPUs without native bf16 matmuls, rounded back to x's dtype
    w = w.to(dtype)  # the grid's weights in the layer's dtype, as it dequantizes them
    assert torch.equal(layer(x), torch.nn.functional.linear(x.to(dt), w.to(dt)).to(dtype))


def test_compiled_int4_linear_agrees_with_eager():
    layer = random_int4_linear()
    x = torch.randn(2, 7, 128)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def quantized(cls, n: int, k: int, dtype=torch.float32):
    """A random Int4Linear/Int8Linear of n rows, k columns, quantized from a normal weight."""
    layer = cls(k, n, dtype=dtype)
    data, scales = (quant.quantize_int4 if cls is Int4Linear else quant.quantize_int8)(torch.randn(n, k))
    layer.load_state_dict({next(iter(layer.state_dict())): data, "scales": scales.to(dtype)})
    return layer


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_tied_embedding_lookup_and_head(cls):
    """As an embedding of 64 rows of 96: lookups dequantize just those rows, unembed is the head."""
    emb = quantized(cls, 64, 96)
    w = emb.dequantize()
    ids = torch.tensor([[0, 5, 63], [7, 7, 1]])
    assert torch.equal(emb.lookup(ids), w[ids])
    x = torch.randn(2, 96)
    torch.testing.assert_close(emb.unembed(x), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls, int8_kernel", [(Int4Linear, False), (Int8Linear, False), (Int8Linear, True)])
def test_cpu_kernels_against_the_dequant_reference(cls, int8_kernel, monkeypatch):
    """The CPU kernels (bf16, few rows) read exactly our weights (bit-exact: identity rows return rows of
    W.T itself) and compute x @ W.T up to accumulation order; larger batches take the portable path.
    Int8Linear both ways: as two int4 digits through the int4 kernel, and through the int8 kernel."""
    monkeypatch.setattr(cpu_kernels, "INT8_AS_INT4_DIGITS", not int8_kernel)
    layer = quantized(cls, 96, 128, torch.bfloat16)
    reference = layer.dequantize()
    cpu_kernels.use_cpu_kernels(layer)
    assert layer.cpu_kernel == ("int8" if int8_kernel else "int4")
    eye = torch.eye(128, dtype=torch.bfloat16)
    for rows in range(0, 128, cpu_kernels.CPU_KERNEL_MAX_ROWS):
        assert cpu_kernels.use_cpu_kernel(eye[rows : rows + 8], 128, cpu_kernels.CPU_KERNEL_MAX_ROWS)
        assert torch.equal(layer(eye[rows : rows + 8]), reference.t()[rows : rows + 8])
    x = torch.randn(1, 3, 128, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), reference.float())
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    big = torch.randn(2, cpu_kernels.CPU_KERNEL_MAX_ROWS, 128, dtype=torch.bfloat16)
    assert not cpu_kernels.use_cpu_kernel(big, 128, cpu_kernels.CPU_KERNEL_MAX_ROWS)
    dtype = cpu_kernels.matmul_dtype(big)  # float32 on CPUs without native bf16
    expected = torch.nn.functional.linear(big.to(dtype), reference.to(dtype)).to(big.dtype)
    assert torch.equal(layer(big), expected)
    monkeypatch.setattr(cpu_kernels, "CPU_TILE_WEIGHTS", 16 * 128)  # the dequant-matmul in six tiles of 16 rows
    assert torch.equal(layer(big), expected)


@pytest.mark.parametrize("int8_kernel", [False, True])
@pytest.mark.parametrize("cls, n, k", [(Int4Linear, 24, 128), (Int8Linear, 24, 128), (Int8Linear, 32, 100)])
def test_shapes_the_cpu_kernel_cannot_take_stay_portable(cls, n, k, int8_kernel, monkeypatch):
    """The kernel wants N % 16 == 0 and whole groups of 32 along K: other shapes keep the dequant-matmul."""
    monkeypatch.setattr(cpu_kernels, "INT8_AS_INT4_DIGITS", not int8_kernel)
    layer = quantized(cls, n, k, torch.bfloat16)
    cpu_kernels.use_cpu_kernels(layer)
    assert layer.cpu_kernel is None
    x = torch.randn(1, k, dtype=torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantize()))


def test_int8_round_to_nearest():
    w = torch.randn(8, 64) * 3
    data, scales = quant.quantize_int8(w)
    assert data.dtype == torch.int8 and scales.shape == (8,) and (data.abs().amax(-1) == 127).all()
    assert ((quant.dequantize_int8(data, scales) - w).abs() <= scales[:, None] / 2 + 1e-6).all()


def test_replace_linears_follows_the_state_dict():
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 32), torch.nn.Sequential(torch.nn.Linear(32, 8, bias=False)), torch.nn.Linear(32, 32)
    )
    quant.replace_linears(model, {"0.int8_data": None, "1.0.int4_data": None})
    assert isinstance(model[0], Int8Linear) and (model[0].in_features, model[0].out_features) == (32, 10)
    assert isinstance(model[1][0], Int4Linear) and isinstance(model[2], torch.nn.Linear)
    with pytest.raises(ValueError, match="no bias"):
        quant.replace_linears(model, {"2.int4_data": None})


def test_weights_policies():
    w4, w8, dense = torch.randn(8, 64), torch.randn(8, 64), torch.randn(8, 64)
    d4, s4 = quant.quantize_int4(w4)
    d8, s8 = quant.quantize_int8(w8)
    qat = quant.dequantize_int4(d4, s4).float()  # on a symmetric int4 grid, as QAT weights are
    tensors = {"a.int4_data": d4, "a.scales": s4, "b.int8_data": d8, "b.scales": s8, "c.weight": dense,
               "d.weight": qat, "norm.weight": torch.randn(64)}  # fmt: skip
    auto = quant.convert_state_dict(tensors, "auto")
    assert auto["a.int4_data"] is d4 and auto["b.int8_data"] is d8 and "c.weight" not in auto
    asymmetric = quant.quantize_int4_asymmetric(dense)  # dense weights get zero points; QAT ones stay exact
    for part, x in zip(("int4_data", "scales", "zeros"), asymmetric, strict=True):
        assert torch.equal(auto[f"c.{part}"], x)
    assert torch.equal(auto["d.int4_data"], d4) and torch.equal(auto["d.scales"], s4) and "d.zeros" not in auto
    all4 = quant.convert_state_dict(tensors, "int4")
    assert set(all4) == {"a.int4_data", "a.scales", "b.int4_data", "b.scales", "c.int4_data", "c.scales", "d.int4_data",
                         "d.scales", "norm.weight"}  # fmt: skip
    assert torch.equal(all4["b.int4_data"], quant.quantize_int4(quant.dequantize_int8(d8, s8))[0])
    dense_sd = quant.convert_state_dict(tensors, "dense")
    assert set(dense_sd) == {"a.weight", "b.weight", "c.weight", "d.weight", "norm.weight"}
    assert torch.equal(dense_sd["a.weight"], quant.dequantize_int4(d4, s4.float()))
    assert torch.equal(dense_sd["b.weight"], quant.dequantize_int8(d8, s8))
    with pytest.raises(ValueError, match="weights must be"):
        quant.convert_state_dict(tensors, "int3")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_head_ranked_by_an_int4_copy(dtype):
    """Int8Linear.unembed with a ranker: the int4 copy's top RESCORE_TOP tokens get the int8 head's exact
    logits, the rest the copy's; the best token is the int8 head's. Without the rescoring this fails."""
    head = quantized(Int8Linear, 4096, 64, dtype)
    reference = torch.nn.functional.linear  # the int8 head and its int4 copy, dequantized
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    int8_logits = reference(x, head.dequantize().to(dtype)).float()
    head.add_ranker()
    head = cpu_kernels.use_cpu_kernels(head)  # bf16: the int4 copy goes through the CPU kernel
    int4_logits = head.ranker(x).float()
    got = head.unembed(x).float()
    top = int4_logits.topk(cpu_kernels.RESCORE_TOP, dim=-1).indices
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(got.gather(-1, top), int8_logits.gather(-1, top), **tol)
    rest = torch.ones_like(got, dtype=torch.bool).scatter(-1, top, False)
    assert torch.equal(got[rest], int4_logits[rest])
    assert torch.equal(got.argmax(-1), int8_logits.argmax(-1))
    assert (int4_logits - int8_logits).abs().max() > 10 * tol["atol"]  # the copy alone would not do


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_indices_finds_what_topk_finds(dtype):
    """One row (decoding's shortcut) against torch.topk: the same k values; float32 without ties, the same
    indices; bf16, full of ties, the same values (a tie at the k-th may take another index)."""
    g = torch.Generator().manual_seed(0)
    for logits in (torch.randn(1, 1, 262144, generator=g) * 4, torch.randn(65536, generator=g).exp()):
        logits = logits.to(dtype)
        expected = logits.topk(1024, dim=-1)
        got = cpu_kernels.top_indices(logits, 1024)
        assert got.shape == expected.indices.shape
        assert torch.equal(logits.gather(-1, got).sort(-1).values, expected.values.sort(-1).values)
        if dtype == torch.float32:
            assert torch.equal(got.sort(-1).values, expected.indices.sort(-1).values)
    flat = torch.zeros(4096, dtype=dtype)  # every logit tied: the shortcut keeps them all as candidates
    assert cpu_kernels.top_indices(flat, 64).unique().numel() == 64
    batch = torch.randn(3, 5, 4096, generator=g).to(dtype)  # several rows: each as it would be alone
    got = cpu_kernels.top_indices(batch, 64)
    assert all(torch.equal(got[i, j], cpu_kernels.top_indices(batch[i, j], 64)) for i in range(3) for j in range(5))
    assert torch.equal(batch.gather(-1, got).sort(-1).values, batch.topk(64, dim=-1).values.sort(-1).values)


def test_a_cached_ranker_is_used_as_it_is():
    """add_ranker takes the ranker cached with a checkpoint (checkpoint.read_ranker) instead of quantizing again;
    a ranked head leaves the matmul to its int4 copy, so only the copy is packed for the CPU kernel."""
    head = quantized(Int8Linear, 4096, 64, torch.bfloat16)
    fresh = quant.int4_ranker(head.int8_data, head.scales)
    cached = {"int4_data": fresh["int4_data"].flip(0), "scales": fresh["scales"].flip(0)}
    head.add_ranker(cached)
    assert torch.equal(head.ranker.int4_data, cached["int4_data"]) and torch.equal(head.ranker.scales, cached["scales"])
    head.add_ranker()
    assert torch.equal(head.ranker.int4_data, fresh["int4_data"]) and torch.equal(head.ranker.scales, fresh["scales"])
    cpu_kernels.use_cpu_kernels(head)
    assert head.cpu_kernel is None and head.ranker.cpu_kernel == "int4"
    assert set(head.state_dict()) == {"int8_data", "scales"}  # derived, not saved: a state dict loads back as is


def test_a_dense_weight_is_rounded_to_nearest_without_the_grid_search(monkeypatch):
    """quantize_int4 on a dense weight: one sampled check, then plain rounding (the full QAT search never runs)."""
    calls = []
    grid_scales = quant.grid_scales
    monkeypatch.setattr(quant, "grid_scales", lambda *a, **k: calls.append(k.get("neighbours")) or grid_scales(*a, **k))
    w = torch.randn(8192, 256)
    data, scales = quant.quantize_int4(w)
    assert calls == [(0,)] * (8192 // quant.ROW_BLOCK)  # one sampled check per slice of rows
    expected = (w.abs().unflatten(-1, (-1, GROUP_SIZE)).amax(-1) / 7).to(torch.bfloat16)
    assert torch.equal(scales, expected)
    grid = quant.dequantize_int4(data, scales.float()).to(torch.bfloat16).float()  # a QAT-like bf16 tensor
    calls.clear()
    assert torch.equal(quant.quantize_int4(grid)[0], data) and None in calls  # judged QAT: the full search ran


def int4_with_zeros(n: int = 48, k: int = 128, dtype=torch.bfloat16, seed: int = 0) -> tuple[Int4Linear, torch.Tensor]:
    """An Int4Linear with zero points, and its W = q * scale + zero in float32, from the parts directly."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=g)
    scales = (torch.rand(n, k // 32, generator=g) / 50 + 1e-3).to(dtype)
    zeros = (torch.randn(n, k // 32, generator=g) / 20).to(dtype)
    layer = Int4Linear(k, n, dtype=dtype, zero_points=True)
    layer.load_state_dict({"int4_data": quant.pack_int4(q), "scales": scales, "zeros": zeros})
    groups = q.float().view(n, k // 32, 32) * scales.float()[..., None] + zeros.float()[..., None]
    return layer, groups.view(n, k)


def test_zero_points_dequantize_as_q_times_scale_plus_zero():
    """W = q * scale + zero, rounded once to the scales' dtype; without zeros no tensor is kept."""
    for dtype in (torch.float32, torch.bfloat16):
        layer, w = int4_with_zeros(dtype=dtype)
        assert torch.equal(layer.dequantize(), w.to(dtype))
        assert set(layer.state_dict()) == {"int4_data", "scales", "zeros"}
    assert set(Int4Linear(128, 48).state_dict()) == {"int4_data", "scales"}  # symmetric: as gaunernst's


def test_cpu_kernel_takes_the_zero_points(monkeypatch):
    """The int4 CPU kernel's zeros are ours: identity rows give W.T bit for bit, and the portable path agrees."""
    layer, w = int4_with_zeros()
    reference = layer.dequantize()
    cpu_kernels.use_cpu_kernels(layer)
    assert layer.cpu_kernel == "int4"
    eye = torch.eye(128, dtype=torch.bfloat16)
    assert torch.equal(layer(eye[:8]), reference.t()[:8])
    x = torch.randn(1, 3, 128, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), reference.float())
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    compiled = torch.compile(int4_with_zeros(dtype=torch.float32)[0], fullgraph=True)
    xf = torch.randn(2, 5, 128)
    torch.testing.assert_close(
        compiled(xf), xf @ int4_with_zeros(dtype=torch.float32)[1].float().t(), rtol=1e-5, atol=1e-5
    )


def test_policies_keep_zero_points():
    layer, w = int4_with_zeros()
    tensors = {f"a.{k}": v for k, v in layer.state_dict().items()}
    for policy in ("auto", "int4"):
        kept = quant.convert_state_dict(tensors, policy)
        assert kept.keys() == tensors.keys() and all(kept[k] is tensors[k] for k in kept)
    assert torch.equal(quant.convert_state_dict(tensors, "dense")["a.weight"], w)
    model = quant.replace_linears(
        torch.nn.Sequential(torch.nn.Linear(128, 48, bias=False)), {"0.int4_data": None, "0.zeros": None}
    )
    assert model[0].zeros is not None and model[0].zeros.shape == (48, 4)


def test_tall_weights_quantize_a_block_of_rows_at_a_time(monkeypatch):
    """A table of many rows (Gemma 4's per-layer embeddings: 262144) is quantized a block of rows at a time, so
    that no whole float32 copy of it exists: int8 is still each row's round to nearest of w / (max |w| / 127),
    and int8 -> int4 under the int4 policy is the whole table's dequantization quantized."""
    monkeypatch.setattr(quant, "ROW_BLOCK", 8)
    w = torch.randn(29, 64) * torch.rand(29, 1)
    data, scales = quant.quantize_int8(w)
    expected_scales = w.abs().amax(-1) / 127
    assert torch.equal(scales, expected_scales) and torch.equal(
        data, torch.round(w / expected_scales[:, None]).to(torch.int8)
    )
    tensors = {"m.int8_data": data, "m.scales": scales}
    out = quant.convert_state_dict(tensors, "int4")
    whole_data, whole_scales = quant.quantize_int4(quant.dequantize_int8(data, scales))
    assert torch.equal(out["m.int4_data"], whole_data) and torch.equal(out["m.scales"], whole_scales)


def test_convert_state_dict_can_consume_its_input():
    """consume=True (loading): each dense weight leaves the input as it is quantized; the result is the same."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(8, 64, generator=g), "n.weight": torch.randn(64, generator=g)}
    tensors["b.int4_data"], tensors["b.scales"] = quant.quantize_int4(torch.randn(4, 64, generator=g))
    for policy in ["auto", "int4", "dense"]:
        kept = quant.convert_state_dict(tensors, policy)
        given = dict(tensors)
        consumed = quant.convert_state_dict(given, policy, consume=True)
        assert kept.keys() == consumed.keys() and all(torch.equal(kept[k], consumed[k]) for k in kept)
        assert sorted(given) == ["b.int4_data", "b.scales"]  # the dense weights went; the int4 parts are small


def test_activation_aware_asymmetric_quantization():
    """column_weights: each input column's squared error weighted (by its inputs' mean square); the weighted
    refit's weighted error is below the unweighted one's, and weights all alike (ones, or any constant) give
    exactly the unweighted result."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) / 20 + torch.rand(64, 1, generator=g) / 10
    column_weights = torch.rand(256, generator=g) ** 4 * 100  # a few columns matter far more

    def weighted_error(parts):
        return ((quant.dequantize_int4(parts[0], parts[1].float(), parts[2]) - w).square() * column_weights).sum()

    for integer in (False, True):
        plain = quant.quantize_int4_asymmetric(w, integer)
        weighted = quant.quantize_int4_asymmetric(w, integer, column_weights)
        assert weighted_error(weighted) < 0.95 * weighted_error(plain)
        for constant in (torch.ones(256), torch.full((256,), 3.0)):
            alike = quant.quantize_int4_asymmetric(w, integer, constant)
            assert all(torch.equal(a, b) for a, b in zip(alike, plain, strict=True))
