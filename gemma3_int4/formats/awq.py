"""AutoAWQ's "gemm" int4 layout (quant_method "awq"), as vLLM, SGLang and transformers load it: each linear
"<m>.qweight" (K, N/8) int32, "<m>.qzeros" (K/group, N/8) int32 and "<m>.scales" (K/group, N), transposed
against nn.Linear's (N, K). Read into, and written from, gaunernst's int4 by hf.py (packed_int4.py does the
nibbles); checkpoint names ("<m>.weight...") in and out.
"""

from __future__ import annotations

import torch

from .. import quant
from .packed_int4 import pack_nibbles, unpack_nibbles

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i (bits 4i..4i+3) of an int32 holds element ORDER[i] of 8
SUFFIXES = ("qweight", "qzeros", "scales")  # a weight's tensors, its packed integers first
REQUIRED = ("qzeros", "scales")


def settings(quantization: dict) -> tuple[int | None, int | None]:
    """The quantization_config's group size and bits."""
    return quantization.get("group_size"), quantization.get("bits")


def unpack(tensors: dict[str, torch.Tensor], module: str, group_size: int) -> tuple[torch.Tensor, ...]:
    """One weight's (N, K) integers 0..15, (N, K/group) zero points and scales, and each column's group (K,)."""
    q = unpack_nibbles(tensors[f"{module}.qweight"], ORDER).t()
    zeros = unpack_nibbles(tensors[f"{module}.qzeros"], ORDER).t()
    return q, zeros, tensors[f"{module}.scales"].t(), torch.arange(q.shape[1]) // group_size


def encode(
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], towers: list[str], not_quantized: list[str]
) -> tuple[dict[str, torch.Tensor], dict]:
    """Our int4 weights ("<m>.weight" -> int4_data, scales, integer zero points) -> AWQ's tensors, and the
    quantization_config naming the towers and the weights written dense as not converted."""
    out = {}
    for base, (int4_data, scales, zp) in weights.items():  # transposed: (K, N/8), (K/32, N/8), (K/32, N)
        out[f"{base}.qweight"] = pack_nibbles(quant.unpack_int4(int4_data).t() + 8, ORDER)
        out[f"{base}.qzeros"] = pack_nibbles(zp.t(), ORDER)
        out[f"{base}.scales"] = scales.t().to(torch.bfloat16).contiguous()
    config = {"quant_method": "awq", "bits": 4, "group_size": quant.GROUP_SIZE, "zero_point": True,
              "version": "gemm", "modules_to_not_convert": towers + not_quantized or None}  # fmt: skip
    return out, config
