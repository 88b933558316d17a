"""The int4 that AWQ (awq.py) and compressed-tensors (compressed_tensors.py) share: unsigned nibbles (q + 8)
packed eight to an int32, with (N, K/32) scales and integer zero points; they differ in the packing order and
orientation. Here: the packing, and the way between their (q, zero point, scale) and our int4 pairs.
"""

from __future__ import annotations

import torch

from .. import quant


def pack_nibbles(u: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Values 0..15 of shape (..., 8M) -> int32 (..., M): each run of 8 along the last dim in one int32."""
    u = u.to(torch.int64).unflatten(-1, (-1, 8))[..., order]  # (..., M, 8), in nibble order
    words = (u << (4 * torch.arange(8))).sum(-1)  # 0 .. 2^32 - 1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_nibbles(packed: torch.Tensor, order: list[int]) -> torch.Tensor:
    """int32 (..., M) -> int64 (..., 8M), values 0..15 (the inverse of pack_nibbles)."""
    nibbles = (packed.to(torch.int64)[..., None] >> (4 * torch.arange(8))) & 0xF  # (..., M, 8), nibble order
    return nibbles[..., torch.argsort(torch.tensor(order))].flatten(-2)


def int4_pair(q_unsigned: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_of: torch.Tensor) -> dict:
    """(N, K) values 0..15, (N, groups) integer zero points and scales, and each column's group (K,) -> our
    {"int4_data", "scales"[, "zeros"]} when the groups are runs of a multiple of 32 columns (each scale and zero
    then repeats: lossless). w = (q_u - zp) * s = q * s + (8 - zp) * s for our q = q_u - 8: zero points of 8
    (symmetric) store no zeros, others the zeros (8 - zp) * s, exact in float32. Activation-ordered groups ->
    a dense float32 "weight", which the weights policy quantizes again."""
    k = q_unsigned.shape[1]
    run = k // scales.shape[1]
    if run % quant.GROUP_SIZE or not torch.equal(group_of, torch.arange(k) // run):
        return {"weight": (q_unsigned - zeros[:, group_of]) * scales.float()[:, group_of]}
    repeat = run // quant.GROUP_SIZE
    pair = {"int4_data": quant.pack_int4(q_unsigned - 8), "scales": scales.repeat_interleave(repeat, dim=1)}
    if not bool((zeros == 8).all()):
        pair["zeros"] = ((8 - zeros) * scales.float()).repeat_interleave(repeat, dim=1)
    return pair


def integer_zero_points(scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor | None:
    """Our zeros as AWQ's and compressed-tensors' integer zero points zp in 0..15 (zeros = (8 - zp) * scales,
    see int4_pair), all 8 without zeros; None if some zero is not such a multiple of its scale (torchao's and
    GGUF's zeros are any float)."""
    if zeros is None:
        return torch.full(scales.shape, 8)
    zp = 8 - torch.round(zeros.float() / scales.float())
    exact = torch.equal((8 - zp) * scales.float(), zeros.float()) and bool(((zp >= 0) & (zp <= 15)).all())
    return zp.long() if exact else None


def float_zero_points(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The int4 linears (our module names) whose zeros no integer zero point gives: the ones that "awq" and
    "compressed-tensors" refit (encode_int4_layout; the embedding and head are written dense)."""
    modules = [k.removesuffix(".zeros") for k in tensors if k.endswith(".zeros") and f"{k[:-6]}.int4_data" in tensors]
    return [m for m in modules if not m.startswith(("embed", "lm_head"))
            and integer_zero_points(tensors[f"{m}.scales"], tensors[f"{m}.zeros"]) is None]  # fmt: skip
