"""GPTQ: post-training int4 quantization of a dense Gemma 3, into quant.py's format, better than round to nearest.

Round to nearest (quant.quantize_int4) rounds each weight on its own. GPTQ (Frantar et al., 2022) quantizes a
weight W (N, K) one input column at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse of the input Hessian H = X^T X, so that the layer's output X W^T on
calibration inputs X moves as little as possible. The format is quant.py's, unchanged: symmetric int4 with one
bf16 scale per 32 consecutive weights along K, so each group's scale is chosen when GPTQ reaches the group's
first column (from the error-updated weights, with a clipping search), and columns are taken in order (no
act-order: it would scatter a group's columns). Groups already on an int4 grid (QAT weights) come out exactly
as quantize_int4 gives them: lossless.

The model is quantized layer by layer: each block's linears see the outputs of the blocks before it, already
quantized, so later layers correct for earlier layers' errors. The tied embedding is quantized last, as the
output head, against the final normed hidden states (the head is where int4 costs the 270M the most).

    tensors = ptq.gptq(config, tensors, ptq.calibration_ids(tokenizer))
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import torch
import torch.nn as nn
from tqdm import tqdm

from . import quant
from .attention import attention_mask
from .config import BOS_ID, VISION_MODULES, Gemma3Config
from .loader import FUSED, from_tensors, fuse_projections, split_projections
from .model import Gemma3, rope_cos_sin
from .tokenizer import Tokenizer

G = quant.GROUP_SIZE

# Standard-library modules whose docstrings are the calibration text: English technical prose with code, like
# what the model is evaluated on, but not pydoc_data.topics (the evaluation text). Pure-Python modules, so every
# Python build has them.
CALIBRATION_MODULES = [
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools", "gzip",
    "heapq", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging", "operator", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "shutil", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "unittest", "urllib.parse", "uuid", "xml.etree.ElementTree", "zipfile",
]  # fmt: skip

# Candidate clipping ratios for a group's scale: absmax * r / 7. Clipping the largest weights a little often
# lowers the group's total error (finer steps for the rest); r = 1 is round to nearest's scale.
CLIP_RATIOS = [1.0 - 0.05 * i for i in range(11)]


def calibration_text() -> str:
    """The docstrings of CALIBRATION_MODULES and their public functions, classes and methods (about 107k tokens
    with Python 3.11), in a fixed order."""
    docs = []
    for name in CALIBRATION_MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module))
        for member_name, member in inspect.getmembers(module):
            if member_name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
                continue  # private, or imported from elsewhere
            docs.append(inspect.getdoc(member))
            if inspect.isclass(member):
                docs += [inspect.getdoc(m) for n, m in vars(member).items() if not n.startswith("_") and callable(m)]
    return "\n\n".join(d for d in docs if d)


def calibration_ids(
    tokenizer: Tokenizer, text: str | None = None, num_seqs: int = 64, seq_len: int = 512
) -> torch.Tensor:
    """(num_seqs, seq_len) token ids: <bos> and then a stretch of `text` (default calibration_text()), the
    stretches spread evenly over the text."""
    ids = torch.tensor(tokenizer.encode(calibration_text() if text is None else text))
    span = seq_len - 1
    if len(ids) < num_seqs * span:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than {num_seqs} x {span}")
    starts = torch.linspace(0, len(ids) - span, num_seqs).long()
    return torch.stack([torch.cat([torch.tensor([BOS_ID]), ids[s : s + span]]) for s in starts.tolist()])


def choose_scales(w: torch.Tensor, clip: bool) -> torch.Tensor:
    """(N, 32) weights -> (N,) scales, bf16 values in float32: the candidate absmax * r / 7 with the least squared
    error after rounding (or r = 1 without clip)."""
    absmax = w.abs().amax(-1)
    best_scale, best_err = None, None
    for r in CLIP_RATIOS if clip else [1.0]:
        s = (absmax * r / 7).to(torch.bfloat16).float()
        s = torch.where(s == 0, torch.ones_like(s), s)  # all-zero group: any scale works
        err = ((torch.round(w / s[:, None]).clamp(-8, 7) * s[:, None] - w) ** 2).sum(-1)
        if best_err is None:
            best_scale, best_err = s, err
        else:
            better = err < best_err
            best_scale, best_err = torch.where(better, s, best_scale), torch.where(better, err, best_err)
    return best_scale


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    damp: float = 0.01,
    block_size: int = 128,
    clip: bool = True,
    row_chunk: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ for one weight: float (N, K) and its input Hessian X^T X (K, K) -> (int4_data (N, K/2) int8, scales
    (N, K/32) bf16), the format quant.quantize_int4 returns.

    damp: added to H's diagonal, as a fraction of its mean (H is often near singular). block_size: columns
    updated lazily together (a multiple of 32). Rows are independent given H: they go row_chunk at a time.
    """
    N, K = w.shape
    if K % G or block_size % G:
        raise ValueError(f"int4 needs K ({K}) and block_size ({block_size}) to be multiples of {G}")
    # Groups already on an int4 grid keep round to nearest's grid and digits, so QAT weights stay lossless.
    # (On the grid: round to nearest reproduces every weight of the group to bf16 precision.)
    rtn_data, rtn_scales = quant.quantize_int4(w)
    rtn_q, rtn_scales = quant.unpack_int4(rtn_data), rtn_scales.float()
    rtn_err = (quant.dequantize_int4(rtn_data, rtn_scales) - w.float()).abs()
    fixed = (rtn_err <= w.float().abs() / 256).unflatten(-1, (-1, G)).all(-1)  # (N, K/32)

    H = hessian.float().clone()
    dead = H.diagonal() == 0  # inputs that were always zero: keep the weight, rounded, and spread nothing
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    # GPTQ's trick: the upper Cholesky factor of H^-1 holds, row by row, each step's error-spreading weights.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    q_all, scales_all = torch.empty(N, K, dtype=torch.int8), torch.empty(N, K // G)
    for r0 in range(0, N, row_chunk):
        rows = slice(r0, r0 + row_chunk)
        W = w[rows].float().clone()
        Q, S = q_all[rows], scales_all[rows]  # views: filled in place
        for b0 in range(0, K, block_size):
            b1 = min(b0 + block_size, K)
            W1, err = W[:, b0:b1], torch.zeros(W.shape[0], b1 - b0)
            for j in range(b1 - b0):
                col = b0 + j
                g = col // G
                if col % G == 0:  # a new group: its scale from the weights as updated so far
                    S[:, g] = torch.where(fixed[rows, g], rtn_scales[rows, g], choose_scales(W1[:, j : j + G], clip))
                s = S[:, g]
                q = torch.where(fixed[rows, g], rtn_q[rows, col].float(), torch.round(W1[:, j] / s).clamp(-8, 7))
                Q[:, col] = q
                e = (W1[:, j] - q * s) / Hinv[col, col]
                W1[:, j:] -= e[:, None] * Hinv[col, col:b1][None, :]  # spread within the block now...
                err[:, j] = e
            W[:, b1:] -= err @ Hinv[b0:b1, b1:]  # ...and to the later blocks at once
    return quant.pack_int4(q_all), scales_all.to(torch.bfloat16)


def dense_model(config: Gemma3Config, tensors: dict[str, torch.Tensor]) -> Gemma3:
    """The language model in float32 from a dense state dict (the vision tower is left out: calibration is text).
    Its weights are copies: they are overwritten as they are quantized, and the caller's must stay as they are."""
    text = {k: v.to(torch.float32, copy=True) for k, v in tensors.items() if not k.startswith(VISION_MODULES)}
    return from_tensors(dataclasses.replace(config, vision_config=None), text, torch.float32)


class HessianHooks:
    """Forward hooks on every nn.Linear under a module, accumulating each one's X^T X (float32), or with
    diagonal=True only its diagonal (K,): each input column's sum of squares."""

    def __init__(self, module: nn.Module, diagonal: bool = False):
        self.hessians: dict[str, torch.Tensor] = {}
        self.diagonal = diagonal
        self.handles = [m.register_forward_hook(self.hook(name)) for name, m in module.named_modules()
                        if isinstance(m, nn.Linear)]  # fmt: skip

    def hook(self, name: str):
        def accumulate(module, inputs, output):
            x = inputs[0].reshape(-1, module.in_features).float()
            self.hessians[name] = self.hessians.get(name, 0) + (x.square().sum(0) if self.diagonal else x.T @ x)

        return accumulate

    def remove(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return self.hessians


@torch.no_grad()
def gptq(
    config: Gemma3Config,
    tensors: dict[str, torch.Tensor],
    calibration: torch.Tensor,
    damp: float = 0.01,
    clip: bool = True,
    sequential: bool = True,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Quantize every 2-D language-model weight of a dense state dict (our names) to int4 with GPTQ, the output
    head included (the tied embedding; an untied embedding is rounded to nearest); norms and the vision tower
    pass through untouched.

    calibration: (B, T) token ids, e.g. calibration_ids(tokenizer). sequential: each block is calibrated on the
    outputs of the blocks before it as quantized (True), or of the dense model (False: one dense pass).
    Returns the state dict with "<module>.int4_data" / "<module>.scales" in place of each "<module>.weight".
    """
    quantized = sorted(k for k in tensors if k.endswith((".int4_data", ".int8_data")))
    if quantized:
        raise ValueError(f"gptq needs dense weights, got quantized {quantized[0]} (quant.convert_state_dict first)")
    model = dense_model(config, tensors)
    out = fuse_projections(tensors, config.num_layers)  # the model's names: q/k/v stacked share one Hessian

    def store(module_name: str, data: torch.Tensor, scales: torch.Tensor) -> None:
        del out[f"{module_name}.weight"]
        out[f"{module_name}.int4_data"], out[f"{module_name}.scales"] = data, scales

    c, T = config, calibration.shape[1]
    pos = torch.arange(T)[None]  # (1, T) for every row: a plain causal forward, as hidden_states without a cache
    rope = {True: rope_cos_sin(pos, c.head_dim, c.rope_theta_global, c.rope_scale_global, torch.float32),
            False: rope_cos_sin(pos, c.head_dim, c.rope_theta_local, 1.0, torch.float32)}  # fmt: skip
    mask = {True: attention_mask(pos, pos), False: attention_mask(pos, pos, c.sliding_window)}

    def run(layer: nn.Module, xs: torch.Tensor) -> torch.Tensor:
        g = layer.is_global
        return torch.cat([layer(xs[i : i + batch_size], rope[g], mask[g]) for i in range(0, len(xs), batch_size)])

    xs = model.embed_tokens(calibration)  # (B, T, D)
    for i, layer in enumerate(tqdm(model.layers, desc="gptq", unit="layer", disable=None)):
        hooks = HessianHooks(layer)
        ys = run(layer, xs)  # the dense layer's outputs, and its linears' Hessians
        for name, hessian in hooks.remove().items():
            linear = layer.get_submodule(name)
            data, scales = gptq_quantize(linear.weight, hessian, damp, clip=clip)
            store(f"layers.{i}.{name}", data, scales)
            linear.weight.copy_(quant.dequantize_int4(data, scales.float()))
        xs = run(layer, xs) if sequential else ys
    h = model.norm(xs).reshape(-1, c.hidden_size)  # what the head sees
    store("embed" if model.lm_head is None else "lm_head", *gptq_quantize(model.head.weight, h.T @ h, damp, clip=clip))
    if model.lm_head is not None:  # an untied embedding is only looked up, never multiplied: round to nearest
        store("embed", *quant.quantize_int4(model.embed.weight))
    return split_projections(out, config)


@torch.no_grad()
def input_mean_squares(
    config: Gemma3Config, tensors: dict[str, torch.Tensor], calibration: torch.Tensor, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """The mean square of each language-model linear's inputs, per input column (K,): the diagonal of its
    Hessian over the calibration tokens, from one pass of the model as `tensors` hold it (any kinds: they are
    dequantized). Keyed by the checkpoint's module names ("layers.0.attn.o_proj"; q, k and v share theirs, as
    gate and up do). quant.quantize_int4_asymmetric's column_weights."""
    model = dense_model(config, quant.convert_state_dict(tensors, "dense"))
    hooks = HessianHooks(model.layers, diagonal=True)
    for i in tqdm(range(0, len(calibration), batch_size), desc="calibration", unit="batch", disable=None):
        model.hidden_states(model.embed_tokens(calibration[i : i + batch_size]))
    out = {}
    for name, sums in hooks.remove().items():  # "0.attn.qkv_proj": the model's names, under model.layers
        layer, _, linear = name.partition(".")
        for part in FUSED.get(linear, (linear,)):
            out[f"layers.{layer}.{part}"] = sums / calibration.numel()
    return out
