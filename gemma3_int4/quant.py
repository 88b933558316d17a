"""INT4 weights: group size 32 along K, bf16 scales, symmetric or with a zero per group.

The storage layout is gaunernst's (the Gemma 3 QAT int4 checkpoints): a weight W (N, K) is
  int4_data: int8 (N, K/2), two's-complement nibbles, element 2j in the low nibble, 2j+1 in the high one
  scales:    (N, K/32), W[n, k] = q[n, k] * scales[n, k // 32]
and, for asymmetric sources only (GGUF Q4_1/Q4_K, AWQ zero points, torchao's Int4Tensor), a third tensor
  zeros:     (N, K/32), W[n, k] = q[n, k] * scales[n, k // 32] + zeros[n, k // 32]
Int4Linear holds exactly these tensors. Its portable path dequantizes on the fly: a few elementwise
ops followed by a matmul, which torch.compile fuses. Int8Linear (per-row scales) is for weights that lose quality
at 4 bits, like llama.cpp's Q8_0/Q6_K. Either serves as a tied embedding/head. replace_linears swaps any model's
nn.Linear/nn.Embedding for the quantized module its state dict asks for.
Reading order: packing, the quantizers (symmetric, asymmetric with zero points, int8), dequantize, the modules,
replace_linears and convert_state_dict.

On CPU the same numbers run faster through kernels (PyTorch's int4 and int8 kernels, w4a8.py's op): which one, and
when, is cpu_kernels.py's to decide. That module sits below this one, which imports only it of ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import cpu_kernels

GROUP_SIZE = 32
QAT_SAMPLE = 4096  # groups sampled to judge whether a weight is on a QAT grid (on_qat_grid)
ROW_BLOCK = 1024  # rows quantized at a time: the float copies quantizing makes stay small (in cache) at any size


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


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)  # of a group's range (quantize_int4_asymmetric)


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


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest int8, one scale per output row: float (N, K) -> (int8 (N, K), float32 scales (N,))."""
    if w.dim() != 2:
        raise ValueError(f"int8 needs a 2-D weight, got shape {tuple(w.shape)}")
    if w.shape[0] > ROW_BLOCK:  # Gemma 4's per-layer embeddings: 2.8 G weights, 11 GB as one float32 copy
        return in_row_blocks(lambda rows: quantize_int8(w[rows]), w.shape[0])
    scales = w.float().abs().amax(-1) / 127
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    return torch.round(w.float() / scales[:, None]).to(torch.int8), scales


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


class QuantLinear(nn.Module):
    """A bias-free linear layer y = x @ W.T whose W (N, K) is dequantized on the fly by the subclass.

    It also serves as a tied embedding of N rows: `lookup` dequantizes only the rows it reads, and
    `unembed` (the output head) is the linear layer itself.

    On CPU, cpu_kernels.use_cpu_kernels chooses a kernel for the layer once, and keeps its choice (and the
    repacked copy that PyTorch's int4 kernel reads) here. The quantized tensors stay as they are: the embedding's
    lookups and large batches (prefill) use them.
    """

    cpu_kernel: str | None = None  # "w4a8", "w8a8", "int4" or "int8" once prepared for that kernel, else None
    cpu_packed: torch.Tensor | None = None  # the weight repacked for the int4 kernel
    cpu_scales_and_zeros: torch.Tensor | None = None  # (groups, N, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.takes(self, x):  # on CPU, the kernels module decides
            return cpu_kernels.matmul(self, x)
        dtype = cpu_kernels.matmul_dtype(x)  # float32 for bf16 where bf16 matmuls are slow
        x_mm = x.to(dtype)
        # On CPU a few MB of weights at a time: each tile is used while it is still in cache, and no weight-sized
        # temporary is allocated (a fresh one costs its page faults)
        tile = max(16, cpu_kernels.CPU_TILE_WEIGHTS // self.in_features)
        rows = tile if x.device.type == "cpu" else self.out_features
        tiles = [
            F.linear(x_mm, self.dequantize(slice(i, i + rows)).to(dtype)) for i in range(0, self.out_features, rows)
        ]
        return torch.cat(tiles, dim=-1).to(x.dtype)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dequantize(ids)  # (..., K)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def dequantize(self, rows=slice(None)) -> torch.Tensor:
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


class Int8Linear(QuantLinear):
    """int8 weights with one scale per output row: int8_data (N, K), scales (N,)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("int8_data", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.ranker: Int4Linear | None = None  # an int4 copy that ranks the vocabulary (cpu_kernels.ranked_unembed)

    def dequantize(self, rows=slice(None)) -> torch.Tensor:
        return dequantize_int8(self.int8_data[rows], self.scales[rows])

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
        return self(x) if self.ranker is None else cpu_kernels.ranked_unembed(self, x)


def int4_ranker(int8_data: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """The int4 copy of an int8 head that ranks its vocabulary (Int8Linear.unembed): round to nearest, g32."""
    data, int4_scales = quantize_int4(dequantize_int8(int8_data, scales))
    return {"int4_data": data, "scales": int4_scales}


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
