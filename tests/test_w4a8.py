"""The W4A8 CPU op (w4a8.cpp) against its plain-PyTorch reference (w4a8.reference): bit for bit, on every
shape class the models have; the reference against the float matmul it approximates."""

import shutil
import sys

import pytest
import torch

from gemma3_int4 import cpu_kernels, files, loader, quant, w4a8
from gemma3_int4.generation import prefill

needs_op = pytest.mark.skipif(not w4a8.load(), reason="the W4A8 op cannot be built on this machine")


def random_weight(n: int, k: int, zeros: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    int4_data = torch.randint(-128, 128, (n, k // 2), generator=g, dtype=torch.int8)
    scales = (torch.rand(n, k // 32, generator=g) * 0.02 + 1e-4).to(torch.bfloat16)
    z = (torch.randn(n, k // 32, generator=g) * 0.05).to(torch.bfloat16) if zeros else None
    return int4_data, scales, z


def random_activations(m: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g))
    x[:, 5] *= 40  # an outlier channel, as real activations have
    if k >= 64:
        x[0, 32:64] = 0  # a group of zeros: d = 0
    return x.to(torch.bfloat16)


# (N, K): the 1B/4B/12B/27B and Gemma 4's projections (N cut short: every row is computed alike), the 270M's,
# an odd number of groups (K = 160, 5376 / 32 = 168 is even: 96 is 3 groups), and N not a multiple of 4
SHAPES = [(64, 1152), (52, 6912), (40, 2560), (36, 10240), (24, 3840), (12, 15360), (20, 5376), (8, 21504),
          (64, 640), (48, 2048), (16, 1536), (33, 96), (7, 160), (1, 32), (5, 1152)]  # fmt: skip


@needs_op
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 6, 37])  # 37: a tile of 32 rows, then 4 + 1
@pytest.mark.parametrize("zeros", [False, True])
def test_op_equals_reference_bit_for_bit(n, k, m, zeros):
    int4_data, scales, z = random_weight(n, k, zeros)
    x = random_activations(m, k)
    got = w4a8.linear(x, int4_data, scales, z)
    want = w4a8.reference(x, quant.unpack_int4(int4_data), scales, z)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert torch.equal(got, want)
    got32 = w4a8.linear(x.float(), int4_data, scales, z)  # before the final rounding to bf16, too
    assert torch.equal(got32, w4a8.reference(x.float(), quant.unpack_int4(int4_data), scales, z))


@needs_op
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 37])
def test_int8_op_equals_reference_bit_for_bit(n, k, m):
    """The int8-weight twin (quant.Int8Linear's per-row scales), -128 included."""
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w[0, :32] = -128
    scales = (torch.rand(n, generator=g) * 0.01 + 1e-4).to(torch.bfloat16)
    x = random_activations(m, k)
    got = w4a8.linear_int8(x, w, scales)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert torch.equal(got, w4a8.reference_int8(x, w, scales))
    assert torch.equal(w4a8.linear_int8(x.float(), w, scales), w4a8.reference_int8(x.float(), w, scales))


@needs_op
def test_op_equals_reference_on_the_tied_head():
    """The 262144-row tied head of every Gemma 3 (K = 1152, the 1B's), one token."""
    int4_data, scales, _ = random_weight(262144, 1152, zeros=False, seed=3)
    x = random_activations(1, 1152)
    want = w4a8.reference(x, quant.unpack_int4(int4_data), scales, None)
    assert torch.equal(w4a8.linear(x, int4_data, scales, None), want)


@needs_op
def test_rows_are_batch_invariant():
    """Each activation row's outputs are the same whatever else the batch holds."""
    int4_data, scales, z = random_weight(40, 2560, zeros=True)
    x = random_activations(9, 2560)
    batched = w4a8.linear(x, int4_data, scales, z)
    alone = torch.cat([w4a8.linear(x[i : i + 1], int4_data, scales, z) for i in range(9)])
    assert torch.equal(batched, alone)


def test_int8_reference_approximates_the_float_matmul():
    g = torch.Generator().manual_seed(4)
    w, scales = quant.quantize_int8(torch.randn(96, 1152, generator=g))
    x = random_activations(4, 1152)
    exact = x.float() @ quant.dequantize_int8(w, scales.to(torch.bfloat16).float()).T
    got = w4a8.reference_int8(x.float(), w, scales.to(torch.bfloat16))
    assert (got - exact).norm() / exact.norm() < 0.02
    assert (w4a8.reference_int8(x.float(), w.flip(1), scales.to(torch.bfloat16)) - exact).norm() / exact.norm() > 0.5


@pytest.mark.parametrize("zeros", [False, True])
def test_reference_approximates_the_float_matmul(zeros):
    """int8 activations cost about 1% relative error here (an outlier channel included), no more: the reference
    computes the product."""
    int4_data, scales, z = random_weight(96, 1152, zeros)
    x = random_activations(4, 1152)
    w = quant.dequantize_int4(int4_data, scales.float(), None if z is None else z.float())
    exact = x.float() @ w.T
    got = w4a8.reference(x.float(), quant.unpack_int4(int4_data), scales, z)
    assert (got - exact).norm() / exact.norm() < 0.02
    flipped = w4a8.reference(x.float(), quant.unpack_int4(int4_data).flip(1), scales, z)  # can fail
    assert (flipped - exact).norm() / exact.norm() > 0.5


def test_activation_quantization_is_llama_cpps():
    x = torch.tensor([[0.5, -1.0, 0.25, 127.0] + [0.0] * 28, [0.0] * 32])
    xq, d, xsum = w4a8.quantize_activations(x)
    assert torch.equal(d, torch.tensor([[1.0], [0.0]]))
    assert xq[0, :4].tolist() == [0, -1, 0, 127]  # 0.5 rounds to even
    assert xsum.tolist() == [[126], [0]] and not xq[1].any()


# The model with int8 activations: the decode loop, batching and torch.compile around the op


@needs_op
def test_int8_activations_in_the_model(tiny_int4_dir):
    """--act int8: every int4 linear runs the op (no packed copy); one-token logits close to the exact path's;
    greedy batches decode as each request alone; a compiled step runs the op too."""
    from gemma3_int4.generation import (
        Request,
        Sampling,
        compile_decode_step,
        decode_one_token,
        generate,
        generate_batch,
    )

    exact = loader.from_pretrained(tiny_int4_dir, activations="bf16")
    model = loader.from_pretrained(tiny_int4_dir, activations="int8")
    layers = [m for m in model.modules() if isinstance(m, quant.Int4Linear)]
    assert layers and all(m.cpu_kernel == "w4a8" and m.cpu_packed is None for m in layers)
    assert all(m.cpu_kernel == "int4" for m in exact.modules() if isinstance(m, quant.Int4Linear))
    ids = torch.tensor([[2, 17, 300, 45, 99]])
    for m in (exact, model):
        m.setup_cache(1, 64)
        prefill(m, ids)
    token, pos = torch.tensor([[7]]), torch.tensor([[5]])
    want, got = decode_one_token(exact, token, pos), decode_one_token(model, token, pos)
    assert (got - want).norm() / want.norm() < 0.05
    step = compile_decode_step(torch.device("cpu"))
    compiled = step(model, token, pos)  # the same op; inductor's fused bf16 elementwise ops round otherwise
    torch.testing.assert_close(compiled, got, rtol=0.05, atol=0.05 * got.abs().max().item())

    prompts = [[2, 17, 300, 45, 99], [2, 8], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    alone = [list(generate(model, p, 16, Sampling(temperature=0))) for p in prompts]
    requests = [Request(p, 16, Sampling(temperature=0)) for p in prompts]
    list(generate_batch(model, requests, rows=3, context=64))
    assert [r.tokens for r in requests] == alone


@needs_op
def test_int8_linear_runs_the_int8_op(monkeypatch):
    """An Int8Linear (a GGUF's Q6_K/Q8_0 tensors) under int8 activations: its twin op up to CPU_KERNEL_MAX_ROWS,
    the exact dequant-matmul beyond; an int8 head's int4 ranker takes the int4 op."""
    layer = quant.Int8Linear(128, 40)
    layer.int8_data, scales = quant.quantize_int8(torch.randn(40, 128))
    layer.scales = scales.to(torch.bfloat16)
    cpu_kernels.use_cpu_kernels(layer, activations="int8")
    assert layer.cpu_kernel == "w8a8"
    x = random_activations(3, 128)
    assert torch.equal(layer(x), w4a8.reference_int8(x, layer.int8_data, layer.scales))
    monkeypatch.setattr(cpu_kernels, "CPU_KERNEL_MAX_ROWS", 2)
    dt = cpu_kernels.matmul_dtype(x)
    assert torch.equal(layer(x), torch.nn.functional.linear(x.to(dt), layer.dequantize().to(dt)).to(x.dtype))
    head = quant.Int8Linear(128, 64)
    head.int8_data, scales = quant.quantize_int8(torch.randn(64, 128))
    head.scales = scales.to(torch.bfloat16)
    head.add_ranker()
    cpu_kernels.use_cpu_kernels(head, activations="int8")
    assert head.cpu_kernel is None and head.ranker.cpu_kernel == "w4a8"


def test_without_the_op_the_int4_kernel_runs(tiny_int4_dir, monkeypatch):
    """Where the op cannot be built, int8 activations fall back to the exact path: PyTorch's int4 kernel."""
    monkeypatch.setattr(w4a8, "_loaded", False)
    model = loader.from_pretrained(tiny_int4_dir, activations="int8")
    assert all(m.cpu_kernel == "int4" for m in model.modules() if isinstance(m, quant.Int4Linear))
    with pytest.raises(ValueError, match="activations must be 'int8' or 'bf16'"):
        cpu_kernels.use_cpu_kernels(model, activations="int16")


def test_a_recorded_build_is_loaded_without_asking_ninja(tmp_path, monkeypatch):
    """Once built, the op's library is recorded with what it was built from; a later start loads it as it is
    (cpp_extension is not even imported), and a record of other sources or flags builds (or checks) again."""
    if not w4a8.load():
        pytest.skip("the op does not build here")
    record = files.cache_dir() / "w4a8-build.json"  # (the library this process loaded: loading it again is a no-op)
    monkeypatch.setenv("GEMMA3_INT4_CACHE", str(tmp_path))
    shutil.copy(record, tmp_path / record.name)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch.utils.cpp_extension", None)  # importing it fails
        m.delattr(torch.utils, "cpp_extension", raising=False)
        assert w4a8._build()
        m.setattr(w4a8, "BUILD", {**w4a8.BUILD, "extra_cflags": ["-O2"]})
        with pytest.raises(ImportError):
            w4a8._build()
