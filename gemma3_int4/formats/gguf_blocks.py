"""GGUF's quantized blocks <-> our int4 / int8 pairs, exactly where the two hold the same numbers: Q4_0
(symmetric int4, an fp16 scale per 32), Q4_1 and Q4_K (int4 with a scale and a minimum per 32: our zero points)
and Q8_0 (int8, here one scale per row). Read by gguf.py from the raw blocks and gguf's own float32
dequantization of them; written as the raw blocks gguf's writer stores.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from .. import quant

Q = gguf.GGMLQuantizationType


def q4_0_ints(raw: np.ndarray, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The integers and scales of a Q4_0 tensor: each block of 32 starts with its fp16 scale d, and gguf's
    dequantization w = q * d is exact in float32, so q = w / d is recovered exactly."""
    n, k = w.shape
    d = torch.from_numpy(np.array(raw)).view(n, k // 32, -1)[..., :2].contiguous().view(torch.float16)
    q = torch.round(w.view(n, k // 32, 32) / d.float())
    return torch.where(d == 0, 0.0, q).view(n, k).to(torch.int8), d.view(n, k // 32)


def q4_zero_ints(raw: np.ndarray, w: torch.Tensor, tensor_type: int) -> tuple[torch.Tensor, ...]:
    """The integers, scales and zeros of a Q4_1 or Q4_K tensor, ours: each group of 32 is w = s * u + b for u in
    0..15 (Q4_1: fp16 s and b in each block; Q4_K: s = d * sc and b = -dmin * mn, with 6-bit sc and mn per 32
    and fp16 d and dmin per 256), so q = u - 8 and zeros = b + 8 s. gguf's float32 dequantization w gives u by
    rounding, and q * s + zeros reproduces w in float32."""
    n, k = w.shape
    blocks = torch.from_numpy(np.array(raw)).view(n, -1, gguf.GGML_QUANT_SIZES[tensor_type][1])
    halves = blocks[..., :4].contiguous().view(torch.float16).float()  # (n, blocks, 2): d and m, or d and dmin
    if tensor_type == Q.Q4_1:
        s, b = halves[..., 0], halves[..., 1]  # (n, k/32)
    else:
        sc, mn = k_quant_scales_mins(blocks[..., 4:16])  # (n, k/256, 8)
        s, b = (halves[..., :1] * sc).flatten(1), -(halves[..., 1:] * mn).flatten(1)
    u = torch.round((w.view(n, k // 32, 32) - b[..., None]) / s[..., None])
    u = torch.where(s[..., None] == 0, 0.0, u).clamp(0, 15)
    return quant.pack_int4((u - 8).view(n, k)), s, b + 8 * s


def k_quant_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and minimums of a Q4_K super-block from its 12 bytes (..., 12) -> (..., 8) each:
    bytes 0-3 hold scales 0-3, 4-7 minimums 0-3 (low 6 bits each); bytes 8-11 the low 4 bits of scales 4-7 and
    minimums 4-7, whose top 2 bits are the top bits of bytes 0-3 and 4-7."""
    p = packed.to(torch.int32)
    high_scales = (p[..., 8:] & 0xF) | ((p[..., :4] >> 6) << 4)
    high_mins = (p[..., 8:] >> 4) | ((p[..., 4:8] >> 6) << 4)
    return torch.cat([p[..., :4] & 63, high_scales], -1).float(), torch.cat([p[..., 4:8] & 63, high_mins], -1).float()


def fp16_scales(scales: torch.Tensor) -> torch.Tensor:
    """Scales as GGUF's fp16 block scales; bf16 has the wider range, so check that nothing overflows or vanishes."""
    half = scales.to(torch.float16)
    if torch.isinf(half).any() or ((half == 0) & (scales != 0)).any():
        raise ValueError("quantization scales outside float16's range cannot be stored in GGUF blocks")
    return half


def q4_block_nibbles(int4_data: torch.Tensor) -> torch.Tensor:
    """Our int4 (N, K/2) -> the 16 bytes of each block of 32 in Q4_0's and Q4_1's order (N, K/32, 16): u = q + 8,
    byte j holding u[j] low and u[j + 16] high."""
    n, k = int4_data.shape[0], int4_data.shape[1] * 2
    u = (quant.unpack_int4(int4_data).view(n, k // 32, 32) + 8).to(torch.uint8)
    return u[..., :16] | (u[..., 16:] << 4)


def q4_0_blocks(int4_data: torch.Tensor, scales: torch.Tensor) -> tuple[np.ndarray, bool]:
    """Our int4 pair -> Q4_0 bytes (N, K/32 * 18), and whether the fp16 scales are exactly ours."""
    n, k = int4_data.shape[0], int4_data.shape[1] * 2
    nibbles = q4_block_nibbles(int4_data)
    d = fp16_scales(scales)
    blocks = torch.cat([d.view(n, k // 32, 1).view(torch.uint8), nibbles], dim=-1)
    return blocks.reshape(n, -1).numpy(), bool(torch.equal(d.float(), scales.float()))


def q4_1_blocks(int4_data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[np.ndarray, float]:
    """Our int4 with zero points -> Q4_1 bytes (N, K/32 * 20): d = scale and m = zero - 8 * scale (w = d * u + m
    for u = q + 8), both fp16; and the largest relative change that fp16 rounding made to a d or m (0: exact)."""
    n = int4_data.shape[0]
    nibbles = q4_block_nibbles(int4_data)
    d, m = scales.float(), zeros.float() - 8 * scales.float()
    halves = torch.stack([fp16_scales(d), m.to(torch.float16)], dim=-1)  # (N, K/32, 2)
    if torch.isinf(halves).any():
        raise ValueError("quantization minimums outside float16's range cannot be stored in GGUF blocks")
    exact = torch.stack([d, m], dim=-1)
    change = ((halves.float() - exact).abs() / exact.abs().clamp(min=torch.finfo(torch.float32).tiny)).max()
    blocks = torch.cat([halves.view(torch.uint8), nibbles], dim=-1)
    return blocks.reshape(n, -1).numpy(), float(change)


def q4_k_blocks(int4_data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> np.ndarray | None:
    """Our int4 with zero points -> Q4_K bytes (N, K/256 * 144), if every 256 weights of a row are a Q4_K block:
    scale_j = d * sc_j and 8 * scale_j - zero_j = dmin * mn_j (w = scale_j * u - dmin * mn_j, u = q + 8) for
    fp16 d, dmin and 6-bit sc_j, mn_j, as a Q4_K source's are; else None."""
    n, k = int4_data.shape[0], int4_data.shape[1] * 2
    if k % 256:
        return None
    s = scales.float().view(n, k // 256, 8)
    scale_grid, min_grid = six_bit_grid(s), six_bit_grid(8 * s - zeros.float().view(n, k // 256, 8))
    if scale_grid is None or min_grid is None:
        return None
    (d, sc), (dmin, mn) = scale_grid, min_grid  # (n, k/256) fp16, (n, k/256, 8) in 0..63
    packed = torch.cat(
        [
            sc[..., :4] | (sc[..., 4:] >> 4 << 6),
            mn[..., :4] | (mn[..., 4:] >> 4 << 6),
            (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4),
        ],
        dim=-1,
    ).to(torch.uint8)  # the inverse of k_quant_scales_mins
    u = (quant.unpack_int4(int4_data).view(n, k // 256, 4, 2, 32) + 8).to(torch.uint8)  # 64-weight chunks
    nibbles = (u[..., 0, :] | (u[..., 1, :] << 4)).flatten(-2)  # byte i of a chunk: u[i] low, u[i + 32] high
    halves = torch.stack([d, dmin], dim=-1).view(torch.uint8)  # (n, k/256, 4)
    return torch.cat([halves, packed, nibbles], dim=-1).reshape(n, -1).numpy()


def six_bit_grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(..., 8) float32 -> an fp16 d (...) and integers (..., 8) in 0..63 with d * integers == x exactly, for
    every block, or None. d is the block's largest value over some integer c (tried from 63 down)."""
    top = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # (..., 1)
    found = top[..., 0] == 0  # an all-zero block: d = 0
    d_found, ints_found = torch.zeros_like(top[..., 0]), torch.zeros_like(x)
    for c in range(63, 0, -1):
        d = (top / c).to(torch.float16).float()
        ints = torch.round(x / d)
        fits = (d * ints == x).all(-1) & ((ints >= 0) & (ints <= 63)).all(-1) & ~found
        d_found, ints_found = torch.where(fits, d[..., 0], d_found), torch.where(fits[..., None], ints, ints_found)
        found |= fits
    return (d_found.to(torch.float16), ints_found.to(torch.int32)) if bool(found.all()) else None


def q8_0_blocks(int8_data: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Our int8 pair -> Q8_0 bytes (N, K/32 * 34): every block of a row gets the row's scale (as fp16)."""
    n, k = int8_data.shape
    d = fp16_scales(scales)[:, None, None].expand(n, k // 32, 1).contiguous().view(torch.uint8)
    blocks = torch.cat([d, int8_data.view(n, k // 32, 32).view(torch.uint8)], dim=-1)
    return blocks.reshape(n, -1).numpy()
