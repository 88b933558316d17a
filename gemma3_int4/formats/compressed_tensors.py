"""compressed-tensors' "pack-quantized" int4 (quant_method "compressed-tensors", W4A16), as vLLM loads it: each
linear "<m>.weight_packed" (N, K/8) int32, "<m>.weight_scale" (N, K/group), "<m>.weight_shape" (2,), and where
not symmetric "<m>.weight_zero_point" packed along N (N/8, K/group); "<m>.weight_g_idx" gives activation-ordered
groups. Read into, and written from, gaunernst's int4 by hf.py (packed_int4.py does the nibbles); checkpoint
names ("<m>.weight...") in and out.
"""

from __future__ import annotations

import torch

from .. import quant
from .packed_int4 import pack_nibbles, unpack_nibbles

ORDER = list(range(8))  # element i in nibble i
SUFFIXES = ("weight_packed", "weight_zero_point", "weight_scale", "weight_shape", "weight_g_idx")  # packed first
REQUIRED = ("weight_scale", "weight_shape")


def settings(quantization: dict) -> tuple[int | None, int | None]:
    """The quantization_config's group size and bits; one config group of grouped int weights, pack-quantized."""
    groups = list(quantization.get("config_groups", {}).values())
    weights = groups[0].get("weights") or {} if len(groups) == 1 else {}
    if len(groups) != 1 or weights.get("strategy") != "group" or weights.get("type") != "int":
        raise ValueError("compressed-tensors: we read one config group of grouped int weights")
    if "pack-quantized" not in (quantization.get("format"), groups[0].get("format")):
        raise ValueError(f"compressed-tensors format {quantization.get('format')!r}: we read pack-quantized")
    return weights.get("group_size"), weights.get("num_bits")


def unpack(tensors: dict[str, torch.Tensor], module: str, group_size: int) -> tuple[torch.Tensor, ...]:
    """One weight's (N, K) integers 0..15, (N, K/group) zero points and scales, and each column's group (K,):
    symmetric (zero points 8) unless a zero point is stored."""
    q = unpack_nibbles(tensors[f"{module}.weight_packed"], ORDER)[:, : int(tensors[f"{module}.weight_shape"][1])]
    scales = tensors[f"{module}.weight_scale"]
    if f"{module}.weight_zero_point" in tensors:  # packed along N: (N/8, K/group)
        zeros = unpack_nibbles(tensors[f"{module}.weight_zero_point"].t(), ORDER).t()[: q.shape[0]]
    else:
        zeros = torch.full(scales.shape, 8)
    group_of = tensors.get(f"{module}.weight_g_idx")  # activation order: each column's group
    group_of = torch.arange(q.shape[1]) // group_size if group_of is None else group_of.long()
    return q, zeros, scales, group_of


def encode(
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], towers: list[str], not_quantized: list[str]
) -> tuple[dict[str, torch.Tensor], dict]:
    """Our int4 weights ("<m>.weight" -> int4_data, scales, integer zero points) -> compressed-tensors' tensors,
    and the quantization_config that ignores the head, the towers and the weights written dense."""
    out = {}
    for base, (int4_data, scales, _) in weights.items():  # (N, K/8), scales (N, K/32), the shape
        q = quant.unpack_int4(int4_data) + 8
        out[f"{base}.weight_packed"] = pack_nibbles(q, ORDER)
        out[f"{base}.weight_scale"] = scales.to(torch.bfloat16)
        out[f"{base}.weight_shape"] = torch.tensor(q.shape, dtype=torch.int64)
    symmetric = all(bool((zp == 8).all()) for _, _, zp in weights.values())
    if not symmetric:  # then every weight has its zero points, packed along N: (ceil(N/8), K/32), padded with 0
        for base, (_, _, zp) in weights.items():
            padded = torch.nn.functional.pad(zp.t(), (0, -zp.shape[0] % 8))
            out[f"{base}.weight_zero_point"] = pack_nibbles(padded, ORDER).t().contiguous()
    weights_config = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "dynamic": False,
                      "group_size": quant.GROUP_SIZE, "actorder": None, "observer": "minmax"}  # fmt: skip
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights_config,
                "format": "pack-quantized",
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ["lm_head"] + not_quantized + [f"re:.*{m}.*" for m in towers],
        "kv_cache_scheme": None,
    }
    return out, config
