"""The vision half of Gemma 3 (4B, 12B, 27B): image preprocessing and the SigLIP tower.

An image is resized to 896x896 and cut into 14x14 patches (64x64 = 4096 of them). The SigLIP-So400m
tower, a plain pre-LN ViT, turns the patches into 4096 vectors; model.py's projector average-pools them
4x4 down to 16x16 = 256 and maps them into the language model's embedding space. In the prompt, each
image is 256 "soft tokens" whose embeddings are these vectors (model.Gemma3.embed_tokens).

The tower stays in bf16 (as the checkpoints store it); the language model may be int4. Module names
follow the checkpoints' (vision_tower.vision_model.*) so that loading is a renaming of prefixes
(formats/hf.py's our_name).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .attention import attention_dtype
from .config import VisionConfig

# ---------------------------------------------------------------------------------------------------
# Preprocessing: any image file -> (3, S, S) float32, as transformers' Gemma3ImageProcessor does it
# (without its optional pan-and-scan crops).


def load_image(path: str | Path | BinaryIO, name: str | None = None, max_pixels: int | None = None,
               formats: tuple[str, ...] | None = None) -> Image.Image:  # fmt: skip
    """Open an image file (or a file object: `name` says what it is in errors), upright (its EXIF orientation
    applied), fully decoded: errors name the file. max_pixels: a larger image is refused by the size in its
    header, before anything is decoded (a small file can decode to gigabytes; Pillow only warns below twice
    its MAX_IMAGE_PIXELS). formats: Pillow's names of those read (default: all it knows); others are refused."""
    name = name or str(path)
    if isinstance(path, (str, Path)) and Path(path).exists() and not Path(path).is_file():
        raise ValueError(f"{path}: not a regular file")  # a directory, or a FIFO that would block forever
    try:
        with Image.open(path, formats=formats) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ValueError(f"{image.width}x{image.height} pixels, more than the {max_pixels} allowed")
            ImageOps.exif_transpose(image, in_place=True)  # (not a copy: a large image is in memory once, not twice)
            image.load()  # decode now, so a truncated file fails here and not later
            return image
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {name}") from None
    except UnidentifiedImageError:
        what = "an image file (or a format pillow cannot read)" if formats is None else f"a {'/'.join(formats)} image"
        raise ValueError(f"{name}: not {what}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: cannot read the image ({e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; an image with transparency is composited onto white first (as transformers' processor does), and
    16-bit grayscale scaled to 8 bits first (Pillow's conversion clips it, so most of it would be white)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # PNG's 16-bit grayscale opens as one of these
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def resize(image: Image.Image, size: int) -> Image.Image:
    """The image as the model sees it: RGB, size x size, bilinear (preprocess of the result gives the same pixels)."""
    return to_rgb(image).resize((size, size), Image.Resampling.BILINEAR)


def preprocess(image: Image.Image | str | Path, size: int = 896) -> torch.Tensor:
    """An image (or its path) -> pixel values (3, size, size) in [-1, 1]: RGB, bilinear resize, (x/255 - 0.5) / 0.5."""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    image = resize(image, size)
    pixels = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32)  # (size, size, 3), rounded once
    pixels = (pixels - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------
# The SigLIP tower: patch embedding + learned positions, pre-LN transformer blocks, a final LayerNorm.


class SiglipAttention(nn.Module):
    """Plain multi-head self-attention with biases; every patch sees every other (no mask)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        dtype = attention_dtype(x.dtype, x.device)
        y = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype)).type_as(x)  # (B, nh, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class SiglipMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """Pixel values (N, 3, S, S) -> patch features (N, 64*64, C), which model.Projector maps into the language
    model's embedding space."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.patch_embedding = nn.Conv2d(3, C, kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.patches_per_side**2, C)  # learned, one per patch
        self.layers = nn.ModuleList(SiglipBlock(config) for _ in range(config.num_layers))
        self.post_layernorm = nn.LayerNorm(C, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        S = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(f"pixel_values must have shape (num_images, 3, {S}, {S}), got {tuple(pixel_values.shape)}")
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(weight.device, weight.dtype))  # (N, C, 64, 64)
        x = x.flatten(2).transpose(1, 2) + self.position_embedding.weight  # (N, 4096, C), row-major patches
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)
