"""The CPU kernels of quant.py's layers, and when each runs; and the ranked int8 head.

quant.py holds the int4 idea: the layout, the quantizers and a portable dequant-matmul that runs anywhere. This
module makes the same numbers fast on the CPU, with the kernels at hand:
  "int4": PyTorch's _weight_int4pack_mm_for_cpu, x @ ((q - 8) * scale + zero).T for q in 0..15 with a scale and a
          zero per group of 32 along K, from a repacked copy of the weight (pack_for_int4_kernel);
  "int8": PyTorch's _weight_int8pack_mm, for int8 weights, on the tensors as they are;
  "w4a8" and "w8a8": w4a8.py's op and its int8 twin, int8 activations (llama.cpp's arithmetic), on the tensors as
          they are.
Reading order: what the CPU can do (CPU_AVX512, CPU_HAS_BF16), the policy (which kernel, up to how many rows),
use_cpu_kernels and pack_for_cpu (choosing a layer's kernel once, at load), takes and matmul (each call), then the
ranked head: an int8 output head whose int4 copy ranks the vocabulary (ranked_unembed, on any device).

Layers: this module sits below quant.py and imports only w4a8 of ours. quant's layers call it (QuantLinear.forward:
"on CPU, the kernels module decides"); it reads a layer by the names quant gives its tensors (int4_data or
int8_data, scales, zeros) and keeps its choice on the layer (cpu_kernel, cpu_packed, cpu_scales_and_zeros).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import w4a8
from .w4a8 import GROUP_SIZE  # quant.py's layout, which the op shares

# What this CPU can do

CPU_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD, ...); "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


# A CPU computes bf16 matmuls natively only with AVX-512 BF16 or AMX; elsewhere (AVX2) PyTorch's bf16 matmul is
# several times slower than float32's (bench/README.md), so there the dequant-matmul (prefill's path) computes in
# float32 and rounds its result back to bf16.
CPU_HAS_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_matmuls_are_slow(device: torch.device) -> bool:
    return device.type == "cpu" and not CPU_HAS_BF16


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype == torch.bfloat16 and bf16_matmuls_are_slow(x.device) else x.dtype


# When each kernel runs (measured: bench/crossover.py, bench/speed.py; the figures in bench/README.md)

# PyTorch's int4 kernel costs about the same per row at any batch; the dequant-matmul costs a dequantization per
# call, then a fast bf16 matmul: the kernel is the faster up to some batch size, the crossover, which
# bench/crossover.py measures (lower on Intel's AVX-512 than on AMD's; without AVX-512 the kernel is compute-bound
# from one row, and a few rows are its limit). Only bf16 (the kernel's dtype) uses it.
CPU_KERNEL_MAX_ROWS = (64 if cpu_vendor() == "GenuineIntel" else 128) if CPU_AVX512 else 8
CPU_TILE_WEIGHTS = 2**21  # weights dequantized at a time by the dequant-matmul on CPU (4 MB in bf16)

# The activations of the CPU's int4 matmuls: "int8", rounded per group of 32 and multiplied in integers (w4a8.py,
# llama.cpp's arithmetic: faster, and within a fraction of a percent in perplexity, bench/quality.py), or "bf16",
# exact (the dequant reference's result, bit for bit). use_cpu_kernels takes this default unless told.
ACTIVATIONS = "int8"
# Up to this many rows the W4A8 op runs, larger batches take the dequant-matmul (bench/crossover.py). Without native
# bf16 the dequant-matmul computes in float32, and the op is the faster up to a whole 512-token prefill chunk;
# with AVX-512 BF16 we take the int4 kernel's crossover until the op's own is measured there.
W4A8_MAX_ROWS = CPU_KERNEL_MAX_ROWS if CPU_HAS_BF16 else 512

# Which CPU kernel is faster for int8 weights depends on the CPU (bench/README.md, "Kernels"). With AVX-512 it is
# the int4 kernel, each weight as two int4 digits, w = 16 * hi + lo with lo in 0..15 and hi in -8..7, side by side
# along K: one int4 matmul of [x, x] accumulates x.lo * s + x.hi * 16s = x.w * s in float32 (8s and 16s are exact
# in bf16). With AVX2 only the int4 kernel is compute-bound, and PyTorch's int8 kernel the faster.
INT8_AS_INT4_DIGITS = CPU_AVX512


# Choosing a layer's kernel, once


def use_cpu_kernels(
    model: nn.Module, lookups_only: tuple[nn.Module, ...] = (), activations: str | None = None
) -> nn.Module:
    """Prepare every bf16 quantized layer (quant.QuantLinear: those with a cpu_kernel) on the CPU for a CPU kernel
    (pack_for_cpu). PyTorch's want N % 16 == 0 and whole groups of 32 along K: layers of other shapes stay on the
    portable path (the W4A8 op takes any). `lookups_only`: embeddings that are never a matmul (untied ones), which
    a packed copy would only cost memory. `activations`: "int8" (int4 weights through the W4A8 op) or "bf16";
    default ACTIVATIONS."""
    activations = activations or ACTIVATIONS
    if activations not in ("int8", "bf16"):
        raise ValueError(f"activations must be 'int8' or 'bf16', not {activations!r}")
    for module in model.modules():
        if hasattr(module, "cpu_kernel") and module.scales.device.type == "cpu" and module not in lookups_only:
            if module.scales.dtype == torch.bfloat16:
                pack_for_cpu(module, activations)
    return model


def pack_for_cpu(layer: nn.Module, activations: str) -> None:
    """Choose the layer's CPU kernel (layer.cpu_kernel) and pack what it reads. int8 activations: the W4A8 op, or
    its twin for int8 weights, on the tensors as they are (no second copy); bf16: PyTorch's kernels, int8 weights
    the int4 kernel as two int4 digits or the int8 kernel, whichever this CPU runs faster."""
    if getattr(layer, "ranker", None) is not None:  # a ranked head: its int4 copy runs the matmul (ranked_unembed)
        pack_for_cpu(layer.ranker, activations)
    elif activations == "int8" and w4a8.load():
        layer.cpu_kernel = "w4a8" if holds_int4(layer) else "w8a8"
    elif not fits_torch_kernels(layer):
        return
    elif holds_int4(layer) or INT8_AS_INT4_DIGITS:
        pack_for_int4_kernel(layer)
    else:
        layer.cpu_kernel = "int8"


def holds_int4(layer: nn.Module) -> bool:
    """An Int4Linear (int4_data), else an Int8Linear (int8_data)."""
    return hasattr(layer, "int4_data")


def fits_torch_kernels(layer: nn.Module) -> bool:
    return layer.out_features % 16 == 0 and layer.in_features % GROUP_SIZE == 0


def pack_for_int4_kernel(layer: nn.Module) -> None:
    """Repack for the int4 kernel, a slice of rows at a time (its packer takes int32: 4 bytes per weight)."""
    pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    packed = [pack(cpu_digits(layer, slice(i, i + 1024)), 1) for i in range(0, layer.out_features, 1024)]
    scales, zeros = cpu_scales_zeros(layer)  # (N, groups) each
    layer.cpu_packed = torch.cat(packed)
    layer.cpu_scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
    layer.cpu_kernel = "int4"


# Our int4 grid is the kernel's with q shifted by 8, and our zero (0 when symmetric) its zero; an int8 weight is two
# of its digits (INT8_AS_INT4_DIGITS), lo and hi + 8, with the scales s and 16s and the zeros 8s and 0.


def cpu_digits(layer: nn.Module, rows: slice) -> torch.Tensor:
    """The kernel's q in 0..15 (int32) for these rows: (rows, K) for int4 weights, (rows, 2K) for int8."""
    if holds_int4(layer):
        u = layer.int4_data[rows].view(torch.uint8) ^ 0x88  # q + 8 in each nibble: its sign bit flipped
        return torch.stack([u & 15, u >> 4], dim=-1).flatten(-2).to(torch.int32)
    w = layer.int8_data[rows].to(torch.int32)
    return torch.cat([w & 15, (w >> 4) + 8], dim=1)  # lo, and hi shifted to 0..15; >> sign-extends


def cpu_scales_zeros(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's scales and zeros, (N, groups) each (groups of its K: twice as many for int8 weights)."""
    if holds_int4(layer):
        return layer.scales, torch.zeros_like(layer.scales) if layer.zeros is None else layer.zeros
    s = layer.scales.float()[:, None].expand(-1, layer.in_features // GROUP_SIZE)  # (N, K/32)
    return torch.cat([s, 16 * s], dim=1), torch.cat([8 * s, 0 * s], dim=1)


# Each call


def use_cpu_kernel(x: torch.Tensor, in_features: int, max_rows: int) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.numel() <= max_rows * in_features


def takes(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether the layer's CPU kernel computes x @ W.T: it has one, and x is a bf16 batch on the CPU within its
    rows; else the dequant-matmul does."""
    # the int8-weight op is a plain GEMV (no prefill tiling): it takes the kernels' crossover
    max_rows = W4A8_MAX_ROWS if layer.cpu_kernel == "w4a8" else CPU_KERNEL_MAX_ROWS
    return layer.cpu_kernel is not None and use_cpu_kernel(x, layer.in_features, max_rows)


def matmul(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(..., K) bf16 -> (..., N) through the layer's CPU kernel."""
    y = cpu_matmul(layer, x.reshape(-1, layer.in_features))  # (M, N)
    return y.view(*x.shape[:-1], layer.out_features)


def cpu_matmul(layer: nn.Module, x2: torch.Tensor) -> torch.Tensor:
    """(M, K) bf16 -> (M, N) through the CPU kernel chosen at packing."""
    if layer.cpu_kernel == "w4a8":  # an Int4Linear's tensors, as they are
        return w4a8.linear(x2, layer.int4_data, layer.scales, layer.zeros)
    if layer.cpu_kernel == "w8a8":  # an Int8Linear's
        return w4a8.linear_int8(x2, layer.int8_data, layer.scales)
    if layer.cpu_kernel == "int8":  # an Int8Linear's weight and row scales, as they are
        return torch.ops.aten._weight_int8pack_mm(x2, layer.int8_data, layer.scales)
    digits_per_weight = 1 if holds_int4(layer) else 2  # int8 weights as two int4 digits (INT8_AS_INT4_DIGITS)
    x2 = torch.cat([x2] * digits_per_weight, dim=1)  # (M, digits * K)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, layer.cpu_packed, GROUP_SIZE, layer.cpu_scales_and_zeros)


# The ranked head. As the output head, an int8 weight costs twice the bytes of int4 per token, and the head is most
# of a small model (the 270M's: 168M of its 268M weights). Yet what sampling and the loss need exact are the
# best-scoring tokens' logits: so an int4 copy (quant.Int8Linear.add_ranker) ranks the whole vocabulary, and the
# int8 weight rescores its top RESCORE_TOP tokens exactly. The rest keep their int4 logits: they are never sampled,
# and only their total mass matters, which int4 noise inflates a little (exp of the noise's variance / 2).
RESCORE_TOP = 1024  # within a few hundredths of the int8 head's perplexity (bench/README.md)


def ranked_unembed(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> logits (..., N): the head's int4 ranker's, with its top RESCORE_TOP tokens' from the int8
    weight."""
    logits = head.ranker(x)  # (..., N)
    top = top_indices(logits, min(RESCORE_TOP, head.out_features))  # (..., k)
    exact = (head.dequantize(top).to(x.dtype) @ x[..., :, None]).squeeze(-1)  # (..., k, K) @ (..., K, 1)
    return logits.scatter(-1, top, exact.to(logits.dtype))


def top_indices(logits: torch.Tensor, k: int, block: int = 64) -> torch.Tensor:
    """The indices (..., k) of the k largest logits along the last dim, as logits.topk(k).indices finds them
    (the same values; a tie at the k-th may take another index). Eager, each row takes an exact shortcut, faster
    over a large vocabulary: the k-th largest of the blocks' maxima is a lower bound t on the k-th largest logit
    (k blocks each hold a logit >= t), so only logits >= t can be among the top k, and topk runs over those few
    (about k of them). Row by row, a row's choice is the same in any batch."""
    n = logits.shape[-1]
    if torch.compiler.is_compiling() or n % block or n // block < k:
        return logits.topk(k, dim=-1).indices
    if logits.numel() != n:  # row by row: each row's choice as it would be alone (ties included)
        return torch.stack([top_indices(row, k, block) for row in logits.reshape(-1, n)]).view(*logits.shape[:-1], k)
    row = logits.reshape(n)
    t = row.view(-1, block).amax(-1).topk(k).values[-1]
    candidates = (row >= t).nonzero().squeeze(1)
    return candidates[row[candidates].topk(k).indices].view(*logits.shape[:-1], k)
