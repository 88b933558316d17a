"""Int4 quantization-aware training (QAT) and LoRA: the weights' side of finetune.py.

QAT: the training forward sees each weight that our int4 checkpoint stores as int4 on that very grid (symmetric,
a bf16 scale per group of 32 along K, q in -8..7), fake-quantized: w_q = round(w / s).clamp(-8, 7) * s with
s = bf16(max |w| / levels). The float weight w is what the optimizer updates; the gradient passes the rounding as
if it were not there (the straight-through estimator). `levels` is 7 per group (Google's grid) for a dense weight;
for an int4 source (a QAT, GPTQ or round-to-nearest checkpoint) each group's own largest |q|, 8 where that is
q = -8, so that training starts from the source's int4 weights exactly and on its grid. int4_tensors quantizes
with the same arithmetic: the int4 model's forward (float32) is the fake-quantized training forward.

LoRA: W + (alpha / rank) * B @ A, with A (rank, K) and B (N, rank, zero at first) the only trained tensors of the
layer; fake-quantized as one weight, so merging B @ A into W before the final quantization changes nothing.
Both are torch parametrizations of the model's own nn.Linear / nn.Embedding weights: model.py stays as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from . import quant
from .config import VISION_MODULES

G = quant.GROUP_SIZE


def grid(w: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float32 -> q (N, K/32, 32) in -8..7 and scales (N, K/32), bf16 values held in float32:
    s = bf16(max |w| / levels) per group (1 for an all-zero group), q = round(w / s)."""
    groups = w.unflatten(-1, (-1, G))  # (N, K/32, 32)
    absmax = groups.abs().amax(-1)
    scales = (absmax / levels).to(torch.bfloat16).float()
    scales = torch.where(absmax == 0, torch.ones_like(scales), scales)
    return torch.round(groups / scales[..., None]).clamp(-8, 7), scales


class FakeQuant(nn.Module):
    """The int4 weight the checkpoint will hold, in the forward; the identity in the backward."""

    def __init__(self, levels: torch.Tensor, enabled: bool = True):
        super().__init__()
        self.register_buffer("levels", levels)  # (N, K/32): each group's largest |q|
        self.enabled = enabled  # off: plain fine-tuning, rounded to the grid only at the end (QAT's baseline)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if isinstance(w, nn.Parameter) and not w.requires_grad:  # frozen (an embedding): quantized when it changes
            if self.frozen_version != (w.data_ptr(), w._version):
                self.frozen, self.frozen_version = self.quantized(w), (w.data_ptr(), w._version)
            return self.frozen
        return w + (self.quantized(w) - w).detach()  # straight-through: the value is w_q, the gradient w's

    frozen: torch.Tensor | None = None
    frozen_version: tuple[int, int] | None = None

    @torch.no_grad()
    def quantized(self, w: torch.Tensor) -> torch.Tensor:
        q, scales = grid(w.float(), self.levels)
        return (q * scales[..., None]).flatten(-2).to(w.dtype)


class RoundToBF16(nn.Module):
    """A float parameter as the checkpoint stores it (bf16: norms, Gemma 4's router), straight-through."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (w.to(torch.bfloat16).to(w.dtype) - w).detach()


class LoRA(nn.Module):
    """W -> W + (alpha / rank) * B @ A: a trained low-rank update of a frozen weight."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.scale = alpha / rank
        a = torch.empty(rank, in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's init, as LoRA's paper
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(out_features, rank))  # zero: training starts from the model as it is

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * (self.B @ self.A).to(w.dtype)


def int4_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights our int4 checkpoint stores as int4 (quant.convert_state_dict "int4"): every
    nn.Linear and nn.Embedding of the language model (the tied embedding is the output head), not Gemma 4's
    router (loader.convert_weights keeps it float) nor a vision tower."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding)) and ".router." not in name and not name.startswith(VISION_MODULES)
    }


def source_levels(w: torch.Tensor) -> torch.Tensor:
    """Each group's largest |q|, for FakeQuant's grid s = bf16(max |w| / levels): the source's own grid where the
    weight is int4 already (exact_levels), else the one quant.quantize_int4 finds: 7 for dense weights, and a QAT
    source's own, to bf16 precision (the rare group whose largest |q| is below 7 keeps its coarser grid)."""
    levels = exact_levels(w)
    if levels is not None:
        return levels
    data, _ = quant.quantize_int4(w)
    levels = quant.unpack_int4(data).unflatten(-1, (-1, G)).abs().amax(-1).float()
    return torch.where(levels == 0, torch.full_like(levels, 7.0), levels)


# Largest |q| tried by exact_levels, the one that counts last: 7 (Google's grid, round to nearest's) before the
# others, then the finest (8: a group whose largest |w| is q = -8, as GPTQ or a clipped scale leaves it)
EXACT_LEVELS = (1, 2, 3, 4, 5, 6, 8, 7)


def exact_levels(w: torch.Tensor) -> torch.Tensor | None:
    """A dequantized int4 weight (N, K) (a checkpoint's, loaded dense: every group exactly q * s, s a bf16 value,
    q in -8..7, whatever its largest |q|) -> each group's largest |q| m, (N, K/32), so that max |w| / m is s and
    the fake quantization reproduces every weight; None for a weight that is not such (a dense one). (A group can
    fit two grids, q all even: m and m / 2. Both give the same weights; the finer is kept.)"""
    blocks = []
    for i in range(0, w.shape[0], quant.ROW_BLOCK):
        groups = w[i : i + quant.ROW_BLOCK].float().unflatten(-1, (-1, G))  # (rows, K/32, 32)
        absmax = groups.abs().amax(-1)
        levels = torch.where(absmax == 0, 7.0, 0.0)  # an all-zero group: any grid
        for m in EXACT_LEVELS:
            s = absmax / m
            q = torch.round(groups / s[..., None])
            exact = (q * s[..., None] == groups).all(-1) & (q >= -8).all(-1) & (q <= 7).all(-1)
            levels = torch.where(exact & (s.to(torch.bfloat16).float() == s), float(m), levels)
        if (levels == 0).any():
            return None  # on the first block for a dense weight: its groups fit no grid
        blocks.append(levels)
    return torch.cat(blocks)


def prepare(
    model: nn.Module,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    targets: tuple[str, ...] = (),
    seed: int = 0,
    fake_quant: bool = True,
    train_embeddings: bool = True,
) -> list[nn.Parameter]:
    """Make a float32 model (loader.from_pretrained, weights="dense") trainable for int4, in place, and return the
    parameters to train. lora_rank 0: full fine-tuning, every parameter of the language model (norms included);
    else LoRA on the linear layers named one of `targets` (the last part of the name), nothing else trained.
    Every other float parameter of the language model is seen rounded to bf16, as the checkpoint stores it.
    fake_quant=False: plain fine-tuning (float weights in the forward), for comparison. train_embeddings=False:
    full fine-tuning leaves the embedding tables as they are (most of a small model's weights: the 270M's 63%)."""
    model.requires_grad_(False)
    modules = int4_modules(model)
    generator = torch.Generator().manual_seed(seed)
    trained = []
    for name, m in modules.items():
        if lora_rank and isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets:
            lora = LoRA(m.out_features, m.in_features, lora_rank, lora_alpha, generator).to(m.weight.device)
            parametrize.register_parametrization(m, "weight", lora)
            trained += [lora.A, lora.B]
        levels = source_levels(m.weight.detach()).to(m.weight.device)
        parametrize.register_parametrization(m, "weight", FakeQuant(levels, fake_quant))
    for name, m in list(model.named_modules()):
        if name in modules or name.startswith(VISION_MODULES) or "parametrizations" in name.split("."):
            continue
        for p_name, _ in list(m.named_parameters(recurse=False)):
            parametrize.register_parametrization(m, p_name, RoundToBF16())
        for b in m.buffers(recurse=False):  # never trained (Gemma 4's layer scalars): rounded once
            if b.is_floating_point() and b.dtype == torch.float32:
                b.copy_(b.to(torch.bfloat16))
    if lora_rank and not trained:
        names = sorted({name.rpartition(".")[2] for name, m in modules.items() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA targets {', '.join(targets)}: none is a linear layer of this model "
                         f"({', '.join(names)})")  # fmt: skip
    if not lora_rank:
        embeddings = [m for m in modules.values() if isinstance(m, nn.Embedding)]
        frozen = [] if train_embeddings else [m.parametrizations.weight.original for m in embeddings]
        trained = [p for name, p in model.named_parameters() if not name.startswith(VISION_MODULES)]
        trained = [p for p in trained if all(p is not f for f in frozen)]
    for p in trained:
        p.requires_grad_(True)
    return trained


def merge(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fold every parametrization into a plain weight (LoRA's B @ A added to W; the fake quantization left out, as
    the weight it quantizes is what int4_tensors takes; the other float parameters rounded to bf16), in place ->
    each int4 layer's grid levels, by name."""
    levels = {}
    modules = int4_modules(model)
    for name, m in list(model.named_modules()):
        if name not in modules and parametrize.is_parametrized(m):
            for p_name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, p_name, leave_parametrized=True)
    for name, m in modules.items():
        if parametrize.is_parametrized(m, "weight"):
            chain = m.parametrizations.weight
            w = chain.original.detach()
            for p in chain:
                if isinstance(p, LoRA):
                    w = p(w).detach()
                elif isinstance(p, FakeQuant):
                    levels[name] = p.levels
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            m.weight = nn.Parameter(w, requires_grad=False)
    return levels


def int4_tensors(model: nn.Module, levels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A merged model (merge) -> its state dict in our names, each layer of `levels` as int4_data and bf16 scales
    on the grid FakeQuant trained on, the rest as it is."""
    tensors = {}
    for name, t in model.state_dict().items():
        module = name.removesuffix(".weight")
        if module not in levels:
            tensors[name] = t.detach().cpu()
            continue
        q, scales = grid(t.detach().float(), levels[module])
        tensors[f"{module}.int4_data"] = quant.pack_int4(q.flatten(-2)).cpu()
        tensors[f"{module}.scales"] = scales.to(torch.bfloat16).cpu()
    return tensors
