"""INT4 weights: group size 32 along K, bf16 scales, symmetric or with a zero per group.

The storage layout is gaunernst's (the Gemma 3 QAT int4 checkpoints): a weight W (N, K) is
  int4_data: int8 (N, K/2), two's-complement nibbles, element 2j in the low nibble, 2j+1 in the high one
  scales:    (N, K/32), W[n, k] = q[n, k] * scales[n, k // 32]
and, for asymmetric sources only (GGUF Q4_1/Q4_K, AWQ zero points, torchao's Int4Tensor), a third tensor
  zeros:     (N, K/32), W[n, k] = q[n, k] * scales[n, k // 32] + zeros[n, k // 32]
Int4Linear holds exactly these tensors. Its portable path dequantizes on the fly: a few elementwise
ops followed by a matmul, which torch.compile fuses; on CPU it runs PyTorch's int4 kernel instead
(Int8Linear: its int8 kernel, or the int4 one as two int4 digits, whichever the CPU runs faster).
Int8Linear (per-row scales) is for weights that lose quality at 4 bits, like llama.cpp's Q8_0/Q6_K.
Either serves as a tied embedding/head. With int8 activations (ACTIVATIONS) an Int4Linear's CPU matmul is
w4a8.py's op instead: llama.cpp's integer arithmetic, on the tensors as stored. This module imports only w4a8 of
ours: replace_linears swaps any model's nn.Linear/nn.Embedding for the quantized module its state dict asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import w4a8

GROUP_SIZE = 32


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7] of shape (N, K) -> int8 (N, K/2), element 2j in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of int4 values ({q.shape[-1]}) into bytes")
    q = q.to(torch.int8)
    return (q[..., 0::2] & 0x0F) | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 (N, K/2) -> int8 (N, K) in [-8, 7]; the arithmetic shifts sign-extend each nibble."""
    return torch.stack([packed << 4 >> 4, packed >> 4], dim=-1).flatten(-2)


def dequantize_int4(int4_data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """The plain reference: (N, K/2) int8, (N, K/32) scales and zeros -> (N, K) in the scales' dtype."""
    q = unpack_int4(int4_data).unflatten(-1, (-1, GROUP_SIZE))  # (N, K/32, 32)
    if zeros is None:
        return (q * scales[..., None]).flatten(-2)
    # q * s + z in float32, rounded once to the scales' dtype (as the CPU kernel computes it)
    return (q * scales.float()[..., None] + zeros.float()[..., None]).to(scales.dtype).flatten(-2)


def grid_scales(
    groups: torch.Tensor, absmax: torch.Tensor, m: int, neighbours: tuple[int, ...] = (-1, 0, 1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Is each group of (N, G, 32) weights on a symmetric int4 grid whose largest |q| is m? -> (scales, fits), (N, G).

    The scale is absmax / m in bf16, or one of its bf16 neighbours: weights stored in bf16 after quantization
    (an AWQ export's embedding, a bf16 QAT checkpoint) moved absmax a little. A candidate fits when it reproduces
    every weight to bf16 precision; of those that fit we take the one closest to the weights. `neighbours`: which
    candidates, in bf16 steps from the nearest."""
    nearest = (absmax / m).to(torch.bfloat16).view(torch.int16)
    candidates = torch.stack([(nearest + d).view(torch.bfloat16) for d in neighbours]).float()  # (candidates, N, G)
    err = (torch.round(groups / candidates[..., None]) * candidates[..., None] - groups).abs()  # (candidates, N, G, 32)
    fits = (err <= groups.abs() / 256).all(-1)
    best = torch.where(fits, err.sum(-1), torch.inf).argmin(0, keepdim=True)
    return candidates.gather(0, best)[0], fits.any(0)


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: float (N, K) -> (int4_data (N, K/2) int8, scales (N, K/32) bf16).

    The scale maps each group's largest magnitude to 7 (the symmetric grid Google's QAT uses); q is rounded
    against the bf16-rounded scale that is stored. QAT weights lie on such a grid already, w = q * s: a group
    that fits it (grid_scales) keeps its s, and the rare group whose largest |q| is m < 7 gets the coarsest
    grid that fits, s = max |w| / m. So QAT weights, and our int4 exported to bf16, round-trip losslessly.
    (A group whose q are all 0 or +-m has two grids, m and 1: we keep the 7-grid, as QAT and RTN make it.)
    """
    if w.dim() != 2 or w.shape[1] % GROUP_SIZE:
        raise ValueError(f"int4 needs a 2-D weight with K a multiple of {GROUP_SIZE}, got shape {tuple(w.shape)}")
    if w.shape[0] > ROW_BLOCK:  # the grid search holds several float copies of the rows
        return in_row_blocks(lambda rows: quantize_int4(w[rows]), w.shape[0])
    groups = w.float().unflatten(-1, (-1, GROUP_SIZE))  # (N, K/32, 32)
    absmax = groups.abs().amax(-1)
    scales = (absmax / 7).to(torch.bfloat16).float()
    if on_qat_grid(w):  # a misjudged dense tensor would only cost time (the search keeps RTN's scales)
        grid, fits = grid_scales(groups, absmax, 7)
        scales = torch.where(fits, grid, scales)
        rest = ~fits & (absmax > 0)  # the few groups whose largest |q| is below 7: the coarsest grid that fits
        if rest.any():
            found = scales[rest]
            for m in range(6, 0, -1):
                coarser, coarser_fits = grid_scales(groups[rest], absmax[rest], m)
                found = torch.where(coarser_fits, coarser, found)
            scales[rest] = found
    scales = torch.where(absmax == 0, torch.ones_like(scales), scales)  # all-zero group: any scale works
    q = torch.round(groups / scales[..., None]).clamp(-8, 7)
    return pack_int4(q.flatten(-2)), scales.to(torch.bfloat16)


def on_qat_grid(w: torch.Tensor) -> bool:
    """Whether a (N, K) weight was trained for int4 (QAT): most of its groups fit the nearest symmetric 7-grid, where
    a dense weight's almost never do (a few in a thousand by chance, in an int8 GGUF head). An even sample of
    groups decides, so that deciding costs little beside quantizing."""
    groups = w.unflatten(-1, (-1, GROUP_SIZE)).flatten(0, 1)
    sample = groups[:: max(1, len(groups) // QAT_SAMPLE)].float()
    return grid_scales(sample, sample.abs().amax(-1), 7, neighbours=(0,))[1].float().mean().item() >= 0.02


QAT_SAMPLE = 4096  # groups


def quantize_int4_asymmetric(
    w: torch.Tensor, integer_zero_points: bool = False, column_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round to nearest with a zero point per group: float (N, K) -> (int4_data, scales (N, K/32) bf16,
    zeros (N, K/32) float32), w = q * s + z for q = -8..7. Each group's range [min, max] maps onto the 16 levels,
    narrowed about its middle by one of CLIP_RATIOS (a group's outliers cost the rest their resolution), or that
    grid's scale (and zero) refitted by least squares (least_squares_grid): whichever gives the group the least
    squared error. integer_zero_points: z = (8 - zp) * s for an integer zp in 0..15,
    AWQ's and compressed-tensors' form (exact in float32); else z is any bf16 value.
    column_weights (K,): each input column's weight in that squared error, activation-aware (the mean square of
    the layer's inputs: an error where the inputs are large moves the output most); None weighs all alike."""
    if w.dim() != 2 or w.shape[1] % GROUP_SIZE:
        raise ValueError(f"int4 needs a 2-D weight with K a multiple of {GROUP_SIZE}, got shape {tuple(w.shape)}")
    if w.shape[0] > ROW_BLOCK:
        rows = range(0, w.shape[0], ROW_BLOCK)
        blocks = [quantize_int4_asymmetric(w[i : i + ROW_BLOCK], integer_zero_points, column_weights) for i in rows]
        return tuple(torch.cat(parts) for parts in zip(*blocks, strict=True))
    groups = w.float().unflatten(-1, (-1, GROUP_SIZE))  # (N, K/32, 32)
    weights = 1.0  # groups are fitted one by one: only the weights within a group matter, so each group's mean 1
    if column_weights is not None:
        weights = column_weights.float().unflatten(-1, (-1, GROUP_SIZE))  # (K/32, 32), the same for every row
        weights = weights / weights.mean(-1, keepdim=True).clamp_min(1e-30)
    low, high = groups.amin(-1), groups.amax(-1)
    scales, zeros, error = torch.ones_like(low), torch.zeros_like(low), torch.full_like(low, torch.inf)
    for ratio in CLIP_RATIOS:
        grid = asymmetric_grid(low, high, ratio, integer_zero_points)
        for s, z in (grid, least_squares_grid(groups, *grid, integer_zero_points, weights)):
            e = grid_error(groups, s, z, weights)
            better = e < error
            scales, zeros, error = torch.where(better, s, scales), torch.where(better, z, zeros), error.minimum(e)
    return pack_int4(on_grid(groups, scales, zeros).flatten(-2)), scales.to(torch.bfloat16), zeros


def least_squares_grid(
    groups: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    integer_zero_points: bool,
    weights: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale (and, unless integer, the zero) that fit each group's weights best by least squares, for the q
    that the grid (scales, zeros) rounds them to: w ~ s * (q + 8 - zp) with the integer zp kept, or w ~ s * q + z.
    weights: each column's weight in the squares, (G, 32) with each group's mean 1 (or 1 for all)."""
    q = on_grid(groups, scales, zeros)  # (N, G, 32)
    dot = torch.linalg.vecdot  # (sums of products without their (N, G, 32) temporary)
    if integer_zero_points:
        shift = torch.round(zeros / scales)  # 8 - zp
        u = q.add_(shift[..., None])
        fit = dot(groups * weights, u) / dot(u * weights, u).clamp_min(1e-12)
        fit = torch.where(fit > 0, fit, scales).to(torch.bfloat16).float()
        return fit, shift * fit
    q_mean, w_mean = (q * weights).mean(-1), (groups * weights).mean(-1)  # weighted means (the weights' mean is 1)
    dq = q.sub_(q_mean[..., None])
    fit = dot(dq * weights, groups - w_mean[..., None]) / dot(dq * weights, dq).clamp_min(1e-12)
    fit = torch.where(fit > 0, fit, scales).to(torch.bfloat16).float()
    return fit, (w_mean - fit * q_mean).to(torch.bfloat16).float()


def asymmetric_grid(
    low: torch.Tensor, high: torch.Tensor, ratio: float, integer_zero_points: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales (bf16 values) and zeros that map each group's range [low, high], narrowed to `ratio` of it about
    its middle, onto q = -8..7."""
    scales = ((high - low) * ratio / 15).to(torch.bfloat16).float()
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # a constant group: any scale works
    lowest = (low + high - (high - low) * ratio) / 2
    if integer_zero_points:
        return scales, (8 - torch.round(-lowest / scales).clamp(0, 15)) * scales
    return scales, (lowest + 8 * scales).to(torch.bfloat16).float()


def on_grid(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The q = -8..7 nearest to each weight of (N, G, 32) groups, w = q * s + z."""
    return (groups - zeros[..., None]).div_(scales[..., None]).round_().clamp_(-8, 7)  # (in place: one copy)


def grid_error(
    groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, weights: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Each group's squared error on its grid, (N, G), each column's square times its weight (least_squares_grid's)."""
    error = on_grid(groups, scales, zeros).mul_(scales[..., None]).add_(zeros[..., None]).sub_(groups).square_()
    return error.mul_(weights).sum(-1)


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)  # of a group's range (quantize_int4_asymmetric)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest int8, one scale per output row: float (N, K) -> (int8 (N, K), float32 scales (N,))."""
    if w.dim() != 2:
        raise ValueError(f"int8 needs a 2-D weight, got shape {tuple(w.shape)}")
    if w.shape[0] > ROW_BLOCK:  # Gemma 4's per-layer embeddings: 2.8 G weights, 11 GB as one float32 copy
        return in_row_blocks(lambda rows: quantize_int8(w[rows]), w.shape[0])
    scales = w.float().abs().amax(-1) / 127
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    return torch.round(w.float() / scales[:, None]).to(torch.int8), scales


ROW_BLOCK = 1024  # rows quantized at a time: the float copies quantizing makes stay small (in cache) at any size


def in_row_blocks(quantize: Callable, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize(rows) -> (data, scales) over the row blocks of an (n_rows, K) weight, concatenated."""
    pieces = [quantize(slice(i, i + ROW_BLOCK)) for i in range(0, n_rows, ROW_BLOCK)]
    return torch.cat([data for data, _ in pieces]), torch.cat([scales for _, scales in pieces])


def dequantize_int8(int8_data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return int8_data * scales[..., None]


def dequantize(tensors: dict[str, torch.Tensor], module: str, rows: slice = slice(None)) -> torch.Tensor:
    """A quantized weight of a state dict (or those of its rows) -> float32 (N, K): "<module>.int4_data" (with
    "<module>.zeros" if it has zero points) or "<module>.int8_data", and "<module>.scales"."""
    scales = tensors[f"{module}.scales"][rows].float()
    if f"{module}.int8_data" in tensors:
        return dequantize_int8(tensors[f"{module}.int8_data"][rows], scales)
    zeros = tensors.get(f"{module}.zeros")
    return dequantize_int4(tensors[f"{module}.int4_data"][rows], scales, None if zeros is None else zeros[rows])


# When each kernel runs (policy, measured; bench/crossover.py, bench/speed.py)

CPU_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD, ...); "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


# PyTorch's CPU int4 kernel costs about the same per row at any batch, bandwidth-bound for one row and
# compute-bound from a few; the dequant-matmul costs a dequantization per call, then a fast bf16 matmul. So
# the kernel is the faster up to some batch size, the crossover. bench/crossover.py measures it for each shape:
# with AVX-512 on AMD Zen 5 it lies between 96 and 192 rows for the 1B and 4B shapes (at 128 neither path loses
# more than a fifth); on an Intel Xeon at 64 (crossover-cpu-avx512-xeon.json: at 128 rows the kernel takes
# 1.7x the dequant-matmul's time). Without AVX-512 the kernel is compute-bound already at one row, and a few
# rows are its limit (8, as measured before). Only bf16 (the kernel's dtype) uses it.
CPU_KERNEL_MAX_ROWS = (64 if cpu_vendor() == "GenuineIntel" else 128) if CPU_AVX512 else 8
CPU_TILE_WEIGHTS = 2**21  # weights dequantized at a time by the dequant-matmul on CPU (4 MB in bf16)


# A CPU computes bf16 matmuls natively only with AVX-512 BF16 or AMX; elsewhere (AVX2) PyTorch's bf16
# matmul is several times slower than float32's (16 against 114 GFLOP/s measured on 2 AVX2 cores), so
# there the dequant-matmul (prefill's path) computes in float32 and rounds its result back to bf16.
CPU_HAS_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_matmuls_are_slow(device: torch.device) -> bool:
    return device.type == "cpu" and not CPU_HAS_BF16


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype == torch.bfloat16 and bf16_matmuls_are_slow(x.device) else x.dtype


# The activations of the CPU's int4 matmuls: "int8", rounded per group of 32 and multiplied in integers (w4a8.py,
# llama.cpp's arithmetic: faster, and within a fraction of a percent in perplexity, bench/quality.py), or "bf16",
# exact (the dequant reference's result, bit for bit). use_cpu_kernels takes this default unless told.
ACTIVATIONS = "int8"
# Up to this many rows the W4A8 op runs, larger batches take the dequant-matmul (bench/crossover.py). Without native
# bf16 the dequant-matmul computes in float32, and the op is the faster up to a whole 512-token prefill chunk;
# with AVX-512 BF16 we take the int4 kernel's crossover until the op's own is measured there.
W4A8_MAX_ROWS = CPU_KERNEL_MAX_ROWS if CPU_HAS_BF16 else 512


def use_cpu_kernel(x: torch.Tensor, in_features: int, max_rows: int) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.numel() <= max_rows * in_features


# Which CPU kernel is faster for int8 weights depends on the CPU. With AVX-512, PyTorch's int8 kernel
# (_weight_int8pack_mm) is the slower: the 270M's int8 head takes 19 ms on 2 cores, where the int4 kernel
# streams the same bytes in 11. So there each weight goes to the int4 kernel as two int4 digits, w = 16 * hi + lo
# with lo in 0..15 and hi in -8..7, side by side along K: one int4 matmul of [x, x] accumulates
# x.lo * s + x.hi * 16s = x.w * s in float32 (8s and 16s are exact in bf16). With AVX2 only, the int4 kernel is
# compute-bound (7.4 GB/s on 2 cores) and the int8 kernel the faster: 17 ms for the head against 28 as digits,
# and the default 270M import decodes at 28 tok/s against 23. There the int8 weight goes to the int8 kernel.
INT8_AS_INT4_DIGITS = CPU_AVX512


# Perplexity of the 270M on 4096 tokens of real text, int8 head 11.70; ranked and rescoring the top
# 64 tokens: 12.02, 256: 11.84, 1024: 11.73, 4096: 11.71. Choosing the top (top_indices) costs about 0.4 ms a token.
RESCORE_TOP = 1024


class QuantLinear(nn.Module):
    """A bias-free linear layer y = x @ W.T whose W (N, K) is dequantized on the fly by the subclass.

    It also serves as a tied embedding of N rows: `lookup` dequantizes only the rows it reads, and
    `unembed` (the output head) is the linear layer itself.

    On CPU, `pack_for_cpu` (see use_cpu_kernels) chooses a CPU kernel for the layer, once: with int8 activations
    an Int4Linear's is "w4a8" (w4a8.py) and an Int8Linear's "w8a8", which read the tensors as they are; otherwise
    one of PyTorch's:
    "int4", _weight_int4pack_mm_for_cpu, which computes x @ ((q - 8) * scale + zero).T for q in 0..15 with a
    scale and a zero per group of 32 along K, from a repacked copy (pack_for_int4_kernel); or for int8
    weights "int8", _weight_int8pack_mm, which reads the weight as it is. The quantized tensors stay as they
    are: the embedding's lookups and large batches (prefill) use them.
    """

    cpu_kernel: str | None = None  # "w4a8", "w8a8", "int4" or "int8" once prepared for that kernel, else None
    cpu_packed: torch.Tensor | None = None  # the weight repacked for the int4 kernel
    cpu_scales_and_zeros: torch.Tensor | None = None  # (groups, N, 2)
    cpu_digits_per_weight = 1  # the int4 kernel's K is cpu_digits_per_weight * in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the int8-weight op is a plain GEMV (no prefill tiling): it takes the kernels' crossover
        max_rows = W4A8_MAX_ROWS if self.cpu_kernel == "w4a8" else CPU_KERNEL_MAX_ROWS
        if self.cpu_kernel is not None and use_cpu_kernel(x, self.in_features, max_rows):
            y = self.cpu_matmul(x.reshape(-1, self.in_features))  # (M, N)
            return y.view(*x.shape[:-1], self.out_features)
        dtype = matmul_dtype(x)
        x_mm = x.to(dtype)
        # On CPU a few MB of weights at a time: each tile is used while it is still in cache, and no weight-sized
        # temporary is allocated (a fresh one costs its page faults: more than the arithmetic, measured)
        rows = max(16, CPU_TILE_WEIGHTS // self.in_features) if x.device.type == "cpu" else self.out_features
        tiles = [
            F.linear(x_mm, self.dequantize(slice(i, i + rows)).to(dtype)) for i in range(0, self.out_features, rows)
        ]
        return torch.cat(tiles, dim=-1).to(x.dtype)

    def cpu_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) bf16 -> (M, N) through the CPU kernel chosen at packing."""
        if self.cpu_kernel == "w4a8":  # an Int4Linear's tensors, as they are
            return w4a8.linear(x2, self.int4_data, self.scales, self.zeros)
        if self.cpu_kernel == "w8a8":  # an Int8Linear's
            return w4a8.linear_int8(x2, self.int8_data, self.scales)
        if self.cpu_kernel == "int8":  # an Int8Linear's weight and row scales, as they are
            return torch.ops.aten._weight_int8pack_mm(x2, self.int8_data, self.scales)
        x2 = torch.cat([x2] * self.cpu_digits_per_weight, dim=1)  # (M, digits * K)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.cpu_packed, GROUP_SIZE, self.cpu_scales_and_zeros)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dequantize(ids)  # (..., K)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def dequantize(self, rows=slice(None)) -> torch.Tensor:
        raise NotImplementedError

    def pack_for_cpu(self, activations: str) -> None:
        raise NotImplementedError

    def fits_torch_kernels(self) -> bool:
        return self.out_features % 16 == 0 and self.in_features % GROUP_SIZE == 0

    def pack_for_int4_kernel(self) -> None:
        """Repack for the int4 kernel, a slice of rows at a time (its packer takes int32: 4 bytes per weight)."""
        pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
        packed = [pack(self.cpu_digits(slice(i, i + 1024)), 1) for i in range(0, self.out_features, 1024)]
        scales, zeros = self.cpu_scales_zeros()  # (N, groups) each
        self.cpu_packed = torch.cat(packed)
        self.cpu_scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.cpu_kernel = "int4"

    def cpu_digits(self, rows: slice) -> torch.Tensor:
        """The kernel's q in 0..15 (int32) for these rows: (rows, cpu_digits_per_weight * K)."""
        raise NotImplementedError

    def cpu_scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int4Linear(QuantLinear):
    """int4 g32 weights in gaunernst's layout: int4_data int8 (N, K/2), scales (N, K/32), and with
    zero_points a zeros (N, K/32) too."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
        zero_points: bool = False,
    ):
        super().__init__()
        if in_features % GROUP_SIZE:
            raise ValueError(f"int4 needs in_features to be a multiple of {GROUP_SIZE}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        groups = (out_features, in_features // GROUP_SIZE)
        self.register_buffer("int4_data", torch.zeros(out_features, in_features // 2, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(groups, dtype=dtype, device=device) if zero_points else None)

    def dequantize(self, rows=slice(None)) -> torch.Tensor:
        zeros = None if self.zeros is None else self.zeros[rows]
        return dequantize_int4(self.int4_data[rows], self.scales[rows], zeros)

    def pack_for_cpu(self, activations: str) -> None:
        """int8 activations: the W4A8 op reads these tensors as they are (no second copy); bf16: the int4 kernel."""
        if activations == "int8" and w4a8.load():
            self.cpu_kernel = "w4a8"
        elif self.fits_torch_kernels():
            self.pack_for_int4_kernel()

    # our grid is the kernel's with q shifted by 8, and our zero (0 when symmetric) its zero
    def cpu_digits(self, rows: slice) -> torch.Tensor:
        u = self.int4_data[rows].view(torch.uint8) ^ 0x88  # q + 8 in each nibble: its sign bit flipped
        return torch.stack([u & 15, u >> 4], dim=-1).flatten(-2).to(torch.int32)

    def cpu_scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scales, torch.zeros_like(self.scales) if self.zeros is None else self.zeros


class Int8Linear(QuantLinear):
    """int8 weights with one scale per output row: int8_data (N, K), scales (N,)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("int8_data", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.ranker: Int4Linear | None = None  # see unembed

    def dequantize(self, rows=slice(None)) -> torch.Tensor:
        return dequantize_int8(self.int8_data[rows], self.scales[rows])

    cpu_digits_per_weight = 2  # on the int4 kernel (INT8_AS_INT4_DIGITS): w = 16 * hi + lo

    def pack_for_cpu(self, activations: str) -> None:
        """The int4 kernel as two int4 digits, or the int8 kernel: whichever this CPU runs faster."""
        if self.ranker is not None:  # a ranked head: its int4 copy runs the matmul, this weight only rescores rows
            self.ranker.pack_for_cpu(activations)
        elif activations == "int8" and w4a8.load():
            self.cpu_kernel = "w8a8"  # the int8 twin of the W4A8 op, on these tensors as they are
        elif not self.fits_torch_kernels():
            return
        elif INT8_AS_INT4_DIGITS:
            self.pack_for_int4_kernel()
        else:
            self.cpu_kernel = "int8"

    def cpu_digits(self, rows: slice) -> torch.Tensor:
        w = self.int8_data[rows].to(torch.int32)
        return torch.cat([w & 15, (w >> 4) + 8], dim=1)  # lo, and hi shifted to 0..15; >> sign-extends

    def cpu_scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scales.float()[:, None].expand(-1, self.in_features // GROUP_SIZE)  # (N, K/32)
        return torch.cat([s, 16 * s], dim=1), torch.cat([8 * s, 0 * s], dim=1)

    # As the output head, an int8 weight costs twice the bytes of int4 per token, and the head is most of a
    # small model (the 270M's: 168M of its 268M weights). Yet what sampling and the loss need exact are the
    # best-scoring tokens' logits: so an int4 copy ranks the whole vocabulary, and the int8 weight rescores
    # its top RESCORE_TOP tokens exactly. The rest keep their int4 logits: they are never sampled, and only
    # their total mass matters, which int4 noise inflates a little (exp of the noise's variance / 2).
    def add_ranker(self, cached: dict[str, torch.Tensor] | None = None) -> None:
        """Give this head an int4 copy of itself (round to nearest, g32) to rank the vocabulary in unembed: the
        `cached` one ({"int4_data", "scales"} from int4_ranker, kept with the checkpoint), or quantized now."""
        ranker = Int4Linear(self.in_features, self.out_features, self.scales.dtype, self.scales.device)
        tensors = int4_ranker(self.int8_data, self.scales) if cached is None else cached
        ranker.load_state_dict(
            {"int4_data": tensors["int4_data"], "scales": tensors["scales"].to(self.scales.dtype)}, assign=True
        )
        # Held outside the module tree: the ranker is derived from this weight, not part of any checkpoint, so
        # state_dict() leaves it out (a model's state dict loads back as it is) and this layer packs it.
        self.__dict__["ranker"] = ranker

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        if self.ranker is None:
            return self(x)
        logits = self.ranker(x)  # (..., N)
        top = top_indices(logits, min(RESCORE_TOP, self.out_features))  # (..., k)
        exact = (self.dequantize(top).to(x.dtype) @ x[..., :, None]).squeeze(-1)  # (..., k, K) @ (..., K, 1)
        return logits.scatter(-1, top, exact.to(logits.dtype))


def top_indices(logits: torch.Tensor, k: int, block: int = 64) -> torch.Tensor:
    """The indices (..., k) of the k largest logits along the last dim, as logits.topk(k).indices finds them
    (the same values; a tie at the k-th may take another index). Eager, each row takes an exact shortcut, twice
    as fast over a 262144-token vocabulary: the k-th largest of the blocks' maxima is a lower bound t on the k-th
    largest logit (k blocks each hold a logit >= t), so only logits >= t can be among the top k, and topk runs
    over those few (about k of them). Row by row, a row's choice is the same in any batch."""
    n = logits.shape[-1]
    if torch.compiler.is_compiling() or n % block or n // block < k:
        return logits.topk(k, dim=-1).indices
    if logits.numel() != n:  # row by row: each row's choice as it would be alone (ties included)
        return torch.stack([top_indices(row, k, block) for row in logits.reshape(-1, n)]).view(*logits.shape[:-1], k)
    row = logits.reshape(n)
    t = row.view(-1, block).amax(-1).topk(k).values[-1]
    candidates = (row >= t).nonzero().squeeze(1)
    return candidates[row[candidates].topk(k).indices].view(*logits.shape[:-1], k)


def int4_ranker(int8_data: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """The int4 copy of an int8 head that ranks its vocabulary (Int8Linear.unembed): round to nearest, g32."""
    data, int4_scales = quantize_int4(dequantize_int8(int8_data, scales))
    return {"int4_data": data, "scales": int4_scales}


def use_cpu_kernels(
    model: nn.Module, lookups_only: tuple[nn.Module, ...] = (), activations: str | None = None
) -> nn.Module:
    """Prepare every bf16 QuantLinear on the CPU for the CPU kernels (QuantLinear.pack_for_cpu). PyTorch's want
    N % 16 == 0 and whole groups of 32 along K: layers of other shapes stay on the portable path (the W4A8 op
    takes any). `lookups_only`: embeddings that are never a matmul (untied ones), which a packed copy would only
    cost memory. `activations`: "int8" (int4 weights through the W4A8 op) or "bf16"; default ACTIVATIONS."""
    activations = activations or ACTIVATIONS
    if activations not in ("int8", "bf16"):
        raise ValueError(f"activations must be 'int8' or 'bf16', not {activations!r}")
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.scales.device.type == "cpu" and module not in lookups_only:
            if module.scales.dtype == torch.bfloat16:
                module.pack_for_cpu(activations)
    return model


class Format(NamedTuple):
    module: type[QuantLinear]
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


FORMATS = {  # state-dict key of the quantized data -> its format
    "int4_data": Format(Int4Linear, quantize_int4),
    "int8_data": Format(Int8Linear, quantize_int8),
}
QUANT_PARTS = (*FORMATS, "scales", "zeros")  # the state-dict keys of a quantized weight's tensors


def replace_linears(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> nn.Module:
    """Swap each nn.Linear / nn.Embedding whose weight `tensors` holds quantized ("<name>.int4_data", with
    "<name>.zeros" if it has zero points, or "<name>.int8_data") for the matching QuantLinear, in place, on the
    module's device."""
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        kind = next((k for k in FORMATS if f"{full}.{k}" in tensors), None)
        if kind is None or not isinstance(child, (nn.Linear, nn.Embedding)):
            replace_linears(child, tensors, f"{full}.")
            continue
        if isinstance(child, nn.Linear) and child.bias is not None:
            raise ValueError(f"{full}: quantized linear layers have no bias")
        out_features, in_features = child.weight.shape  # nn.Embedding's (V, D) is a head's (N, K)
        zero_points = {"zero_points": True} if f"{full}.zeros" in tensors else {}
        setattr(model, name, FORMATS[kind].module(in_features, out_features, device=child.weight.device, **zero_points))
    return model


# State dicts: a dense weight is "<module>.weight"; a quantized one "<module>.int4_data" or "<module>.int8_data",
# with "<module>.scales" (and an int4 one with zero points "<module>.zeros").


def convert_state_dict(
    tensors: dict[str, torch.Tensor],
    weights: str,
    above_4_bits: set[str] = frozenset(),
    consume: bool = False,
    integer_zero_points: bool = False,
) -> dict[str, torch.Tensor]:
    """Apply a weights policy to a state dict:
    "auto":  dense 2-D weights -> int4: QAT weights on their symmetric grid, exactly (quantize_int4), others
             asymmetric with zero points (quantize_int4_asymmetric; measured on the 270M's float weights, see
             bench/quantizers.py); or int8 if named in above_4_bits (a GGUF stored them at more than 4 bits);
             int4 (zero points included) and int8 stay;
    "int4":  everything -> int4, symmetric round to nearest (int8 is dequantized first; int4 stays as it is);
    "dense": everything -> float32.
    integer_zero_points: "auto"'s zero points as AWQ and compressed-tensors hold them (convert.py's targets).
    consume: take each dense weight out of `tensors` once quantized, so that a source held in memory (a GGUF's
    dequantized tensors, a pickle's) is freed as it goes, not at the end. (Safetensors are memory-mapped: their
    pages are the page cache's, which the kernel takes back as it needs.)
    """
    if weights not in ("auto", "int4", "dense"):
        raise ValueError(f"weights must be 'auto', 'int4' or 'dense', not {weights!r}")
    out = {}
    for name in tqdm(list(tensors), desc=f"weights: {weights}", unit="tensor", disable=None, leave=False):
        t = tensors.pop(name) if consume and name.endswith(".weight") else tensors[name]
        module, _, kind = name.rpartition(".")
        if kind in FORMATS:
            keep = weights != "dense" and (kind == "int4_data" or (kind == "int8_data" and weights == "auto"))
            if keep:
                parts = [f"{module}.{part}" for part in QUANT_PARTS]
                out.update({part: tensors[part] for part in parts if part in tensors})
                continue
            if weights == "int4":  # int8 -> int4, a block of rows at a time (never the whole table in float32)
                requantize = lambda rows, module=module: quantize_int4(dequantize(tensors, module, rows))
                n_rows = tensors[name].shape[0]
                out[f"{module}.int4_data"], out[f"{module}.scales"] = in_row_blocks(requantize, n_rows)
                continue
            t = dequantize(tensors, module)  # float32
            kind = "weight"
        if kind == "weight" and t.dim() == 2 and weights == "auto" and name in above_4_bits:
            out[f"{module}.int8_data"], out[f"{module}.scales"] = quantize_int8(t)
        elif kind == "weight" and t.dim() == 2 and weights == "auto" and not on_qat_grid(t):
            parts = quantize_int4_asymmetric(t, integer_zero_points)
            out.update(zip((f"{module}.int4_data", f"{module}.scales", f"{module}.zeros"), parts, strict=True))
        elif kind == "weight" and t.dim() == 2 and weights != "dense":
            out[f"{module}.int4_data"], out[f"{module}.scales"] = quantize_int4(t)
        elif kind not in ("scales", "zeros"):
            out[f"{module}.{kind}"] = t
    return out
