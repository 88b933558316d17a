"""The W4A8 CPU op (w4a8.cpp) against its plain-PyTorch reference (w4a8.reference): bit for bit, on every
shape class the models have; the reference against the float matmul it approximates."""

import pytest
import torch

import quant
import w4a8

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
@pytest.mark.parametrize("m", [1, 3, 17])
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
