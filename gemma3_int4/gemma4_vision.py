"""The vision half of Gemma 4 (every size): image preprocessing and its vision tower.

Unlike Gemma 3's fixed 896x896 (vision.py), an image keeps its aspect ratio: it is resized to the largest size
whose sides are multiples of 48 px (3x3 patches of 16 px) and whose patches fit a budget of max_soft_tokens x 9
(280 soft tokens by default; 70, 140, 560 or 1120 on request). The tower is built like Gemma 4's decoder
(RMSNorm sandwich blocks, q/k/v norms, attention unscaled, a GeGLU MLP) with what a 2D grid needs:
- each 16x16 patch is embedded linearly from its pixels mapped to [-1, 1], plus a learned row of an x table
  and one of a y table (position tables);
- attention sees every patch of the image both ways; queries and keys turn by the patch's x on the first half
  of each head and by its y on the second (2D axial RoPE, theta 100);
- the linears may clamp their inputs and outputs to stored scalar bounds ("clippable linears");
- the output: each 3x3 block of patches averages into one soft token, scaled by sqrt(hidden) (pooling),
  optionally standardised by stored vectors; embed_vision normalises that and projects it into the language
  model's embedding space.
In the prompt an image is <|image> + one <|image|> per soft token + <image|>; the model puts the image's
embeddings at the <|image|> tokens (gemma4.Gemma4.embed_tokens).

The tower stays float (bf16 as the checkpoints store it); module names follow the checkpoints'
(model.vision_tower.*, formats/hf.py's our_name), so loading is a renaming of prefixes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .attention import attention_dtype
from .config import SOFT_TOKEN_BUDGETS, Gemma4VisionConfig
from .model import Gemma4RMSNorm, apply_rope, rope_cos_sin
from .vision import load_image, to_rgb

# ---------------------------------------------------------------------------------------------------
# Preprocessing: any image file -> (3, H, W) float32 in [0, 1], as transformers' Gemma4ImageProcessorPil does it.


def resized_size(height: int, width: int, max_soft_tokens: int = 280, patch: int = 16, pool: int = 3) -> tuple:
    """The (height, width) an image is resized to: the aspect ratio kept, both sides multiples of pool * patch, at
    most max_soft_tokens * pool^2 patches. A very thin image keeps one block across, and its length is capped."""
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise ValueError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {max_soft_tokens!r}")
    side = pool * patch
    factor = math.sqrt(max_soft_tokens * pool**2 * patch**2 / (height * width))
    h, w = math.floor(factor * height / side) * side, math.floor(factor * width / side) * side
    longest = max_soft_tokens * side  # one block across: the budget's soft tokens in a line
    if h == 0:
        h, w = side, min(width // height * side, longest)
    elif w == 0:
        h, w = min(height // width * side, longest), side
    return h, w


def resize(image: Image.Image, max_soft_tokens: int = 280) -> Image.Image:
    """The image as the model sees it: RGB, resized (bicubic) to resized_size."""
    image = to_rgb(image)
    h, w = resized_size(image.height, image.width, max_soft_tokens)
    return image.resize((w, h), Image.Resampling.BICUBIC)


def preprocess(image: Image.Image | str | Path, max_soft_tokens: int = 280) -> torch.Tensor:
    """An image (or its path) -> pixel values (3, H, W) in [0, 1] (x / 255, rounded once to float32)."""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    pixels = (np.asarray(resize(image, max_soft_tokens), dtype=np.float64) * (1 / 255)).astype(np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def soft_tokens(pixels: torch.Tensor, config: Gemma4VisionConfig) -> int:
    """How many soft tokens an image's pixel values (3, H, W) become: one per pool x pool block of patches."""
    side = config.patch_size * config.pooling_kernel_size
    return (pixels.shape[1] // side) * (pixels.shape[2] // side)


# ---------------------------------------------------------------------------------------------------
# The tower.


class ClippableLinear(nn.Module):
    """A linear layer without bias that may clamp its input and output to stored scalar bounds (use_clipped_linears:
    the checkpoint's input_min/input_max/output_min/output_max; otherwise a plain linear)."""

    def __init__(self, config: Gemma4VisionConfig, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.clipped = config.use_clipped_linears
        if self.clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                self.register_buffer(name, torch.tensor(math.inf if name.endswith("max") else -math.inf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clipped:
            return self.linear(x)
        return self.linear(x.clamp(self.input_min, self.input_max)).clamp(self.output_min, self.output_max)


class PatchEmbedder(nn.Module):
    """Patches (n, 3 * patch^2) at grid positions (n, 2) of (x, y) -> (n, C): a linear map of the pixels in [-1, 1],
    plus row x of the x table and row y of the y table."""

    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, config.position_embedding_size, config.hidden_size))

    def forward(self, patches: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        x = self.input_proj((2 * (patches - 0.5)).to(self.input_proj.weight.dtype))
        return x + self.position_embedding_table[0][xy[:, 0]] + self.position_embedding_table[1][xy[:, 1]]


class VisionAttention(nn.Module):
    """Every patch attends to every other, unscaled (the q/k norms set the scale), with 2D axial RoPE."""

    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        C, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.q_proj = ClippableLinear(config, C, config.num_heads * hd)
        self.k_proj = ClippableLinear(config, C, config.num_kv_heads * hd)
        self.v_proj = ClippableLinear(config, C, config.num_kv_heads * hd)
        self.o_proj = ClippableLinear(config, config.num_heads * hd, C)
        self.q_norm = Gemma4RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = Gemma4RMSNorm(hd, config.rms_norm_eps)
        self.v_norm = Gemma4RMSNorm(hd, config.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        B, T, _ = x.shape
        q = rotate_2d(self.q_norm(self.q_proj(x).view(B, T, self.num_heads, -1)).transpose(1, 2), *rope)
        k = rotate_2d(self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, -1)).transpose(1, 2), *rope)
        v = self.v_norm(self.v_proj(x).view(B, T, self.num_kv_heads, -1)).transpose(1, 2)  # (B, n_kv, T, hd)
        dtype = attention_dtype(x.dtype, x.device)
        y = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale=1.0, enable_gqa=True)
        return self.o_proj(y.type_as(x).transpose(1, 2).reshape(B, T, -1))  # y: (B, nh, T, hd)


def rotate_2d(x: torch.Tensor, cos_x, sin_x, cos_y, sin_y) -> torch.Tensor:
    """Axial RoPE on x (B, nh, T, hd): the first half of each head turns by the patch's x, the second by its y,
    each half rotate-half style."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([apply_rope(first, cos_x, sin_x), apply_rope(second, cos_y, sin_y)], dim=-1)


class VisionMLP(nn.Module):
    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        self.gate_proj = ClippableLinear(config, config.hidden_size, config.intermediate_size)
        self.up_proj = ClippableLinear(config, config.hidden_size, config.intermediate_size)
        self.down_proj = ClippableLinear(config, config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class VisionBlock(nn.Module):
    """The decoder's sandwich norms (gemma4.Block), without a cache or mask."""

    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        C, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = Gemma4RMSNorm(C, eps)
        self.self_attn = VisionAttention(config)
        self.post_attention_layernorm = Gemma4RMSNorm(C, eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(C, eps)
        self.mlp = VisionMLP(config)
        self.post_feedforward_layernorm = Gemma4RMSNorm(C, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionTower(nn.Module):
    """One image's pixel values (3, H, W) -> its soft tokens (H/48 * W/48, C), in reading order, float32 until
    the embedder (the sqrt(C) scaling can exceed float16's range)."""

    def __init__(self, config: Gemma4VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_layers))
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        c, p, k = self.config, self.config.patch_size, self.config.pooling_kernel_size
        if pixels.dim() != 3 or pixels.shape[0] != 3 or pixels.shape[1] % (p * k) or pixels.shape[2] % (p * k):
            raise ValueError(f"pixel values must be (3, H, W), H and W multiples of {p * k}: got {tuple(pixels.shape)}")
        rows, cols = pixels.shape[1] // p, pixels.shape[2] // p
        if max(rows, cols) > c.position_embedding_size:
            raise ValueError(f"a {rows}x{cols} patch grid exceeds the {c.position_embedding_size} position rows")
        weight = self.patch_embedder.input_proj.weight
        pixels = pixels.to(weight.device, torch.float32)
        patches = pixels.view(3, rows, p, cols, p).permute(1, 3, 2, 4, 0).reshape(rows * cols, -1)  # (n, p*p*3)
        y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        xy = torch.stack([x.flatten(), y.flatten()], dim=-1).to(weight.device)  # (n, 2), row-major patches
        h = self.patch_embedder(patches, xy)[None]  # (1, n, C)
        cos_x, sin_x = rope_cos_sin(xy[None, :, 0], c.head_dim // 2, c.rope_theta, 1.0, h.dtype)
        cos_y, sin_y = rope_cos_sin(xy[None, :, 1], c.head_dim // 2, c.rope_theta, 1.0, h.dtype)
        for layer in self.layers:
            h = layer(h, (cos_x, sin_x, cos_y, sin_y))
        grid = h[0].float().view(rows, cols, -1).permute(2, 0, 1)  # (C, rows, cols)
        pooled = F.avg_pool2d(grid, k).flatten(1).T * math.sqrt(c.hidden_size)  # (rows/k * cols/k, C)
        if c.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        return pooled


class Embedder(nn.Module):
    """A tower's output (n, C) -> the language model's embedding space (n, D): scale-free RMSNorm, then a linear
    map (transformers' Gemma4MultimodalEmbedder; embed_vision and embed_audio)."""

    def __init__(self, tower_size: int, text_hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.embedding_pre_projection_norm = Gemma4RMSNorm(tower_size, eps, with_scale=False)
        self.embedding_projection = nn.Linear(tower_size, text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.embedding_projection.weight
        return self.embedding_projection(self.embedding_pre_projection_norm(x.to(weight.dtype)))
