"""The audio half of Gemma 4 (E2B, E4B): WAV files, log-mel features and the audio tower.

A recording becomes 16 kHz mono samples, then 128 log-mel bins every 10 ms (20 ms Hann frames, as transformers'
Gemma4AudioFeatureExtractor computes them). The tower is a Conformer:
- two stride-2 3x3 convolutions over (time, mel) cut the frames to one per 40 ms, each a vector of hidden_size;
- each layer: a feed-forward at half step, local self-attention, a light (depthwise, causal) convolution, another
  half-step feed-forward; RMSNorms around each, and every linear optionally clamped to stored bounds;
- the attention is local and causal: a frame sees itself and the 11 frames before it. transformers computes
  it in chunks of 12 frames, each with a context of 24, and masks what lies outside the window: the same as
  each frame's own window here. Its logits add a relative-position term (a learned projection of a sinusoid of
  the distance) to the content term and are soft-capped at 50 (a logit cap);
- a final projection to output_proj_dims; embed_audio (gemma4_vision.Embedder) maps it into the embedding space.
In the prompt a recording is <|audio> + one <|audio|> per 40 ms + <audio|>.

The tower stays float, as the checkpoints store it; module names follow the checkpoints' (model.audio_tower.*).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Gemma4AudioConfig
from .gemma4_vision import ClippableLinear
from .model import Gemma4RMSNorm

SAMPLE_RATE = 16_000
MAX_SECONDS = 30  # transformers' extractor keeps the first 30 s (480,000 samples): 750 soft tokens at most

# ---------------------------------------------------------------------------------------------------
# WAV files -> 16 kHz mono float32 samples. Read by hand: the stdlib's wave module reads integer PCM only (float
# WAV from Python 3.12), and the two share everything but the sample format.

PCM, FLOAT, EXTENSIBLE = 1, 3, 0xFFFE  # WAV format tags


def load_audio(path: str | Path | BinaryIO, name: str | None = None) -> np.ndarray:
    """A WAV file (or file object: `name` says what it is in errors): 8/16/24/32-bit integer PCM or 32/64-bit
    float, mono or more channels (averaged), any rate (resampled to 16 kHz) -> float32 samples in [-1, 1]."""
    name = name or str(path)
    try:
        data = path.read() if hasattr(path, "read") else Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"audio not found: {name}") from None
    except OSError as e:
        raise ValueError(f"{name}: cannot read the audio ({e.strerror or e})") from None
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{name}: not a WAV file (audio must be WAV: integer PCM or float, any rate and channels)")
    samples, rate = parse_wav(data, name)
    return resample(samples, rate, SAMPLE_RATE)


def parse_wav(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """The RIFF chunks of a WAV file -> mono float32 samples and their rate."""
    fmt = body = None
    i = 12
    while i + 8 <= len(data):
        chunk, size = data[i : i + 4], struct.unpack("<I", data[i + 4 : i + 8])[0]
        if chunk == b"fmt ":
            fmt = data[i + 8 : i + 8 + size]
        elif chunk == b"data":
            body = data[i + 8 : i + 8 + size]
        i += 8 + size + size % 2  # chunks are padded to even sizes
    if fmt is None or len(fmt) < 16 or body is None:
        raise ValueError(f"{name}: a WAV file without its fmt or data chunk")
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]  # the sub-format GUID starts with the tag
    kinds = {(PCM, 8): "u1", (PCM, 16): "<i2", (PCM, 32): "<i4", (FLOAT, 32): "<f4", (FLOAT, 64): "<f8"}
    if channels < 1 or rate < 1 or ((tag, bits) not in kinds and (tag, bits) != (PCM, 24)):
        raise ValueError(f"{name}: WAV of format {tag}, {bits} bits, {channels} channel(s), {rate} Hz is not read "
                         "(integer PCM of 8, 16, 24 or 32 bits, or 32/64-bit float)")  # fmt: skip
    width = bits // 8 * channels
    body = body[: len(body) - len(body) % width]
    if bits == 24:  # three bytes, little-endian, signed: widened to 32 bits
        b = np.frombuffer(body, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float64) / 2**23
    else:
        x = np.frombuffer(body, kinds[tag, bits]).astype(np.float64)
        if tag == PCM:
            x = (x - 128) / 128 if bits == 8 else x / 2 ** (bits - 1)
    return x.reshape(-1, channels).mean(axis=1).astype(np.float32), rate


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling by the Fourier transform: the spectrum cut (or zero-extended) to the new rate's
    Nyquist frequency."""
    if rate == target or len(samples) == 0:
        return samples
    n = max(1, round(len(samples) * target / rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))[: n // 2 + 1]
    return (np.fft.irfft(spectrum, n) * (n / len(samples))).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Log-mel features, as transformers' Gemma4AudioFeatureExtractor computes them (value for value).

FRAME, HOP, FFT, MELS = 320, 160, 512, 128  # 20 ms frames every 10 ms, at 16 kHz
MEL_FLOOR = 1e-3


def mel_filters(num_bins: int = FFT // 2 + 1, num_mels: int = MELS, low: float = 0.0, high: float = 8000.0):
    """(num_bins, num_mels) triangular filters, evenly spaced on the HTK mel scale, unnormalised."""
    mel = np.linspace(2595.0 * np.log10(1.0 + low / 700.0), 2595.0 * np.log10(1.0 + high / 700.0), num_mels + 2)
    centers = 700.0 * (np.power(10, mel / 2595.0) - 1.0)
    slopes = centers[None, :] - np.linspace(0, SAMPLE_RATE // 2, num_bins)[:, None]
    down = -slopes[:, :-2] / np.diff(centers)[:-1]
    up = slopes[:, 2:] / np.diff(centers)[1:]
    return np.maximum(0.0, np.minimum(down, up))


def log_mel(samples: np.ndarray) -> torch.Tensor:
    """16 kHz samples -> (frames, 128) log-mel features: the signal padded by half a frame in front, frames of
    320 samples every 160 (only those wholly inside the signal), a periodic Hann window, |FFT of 512|, the mel
    filters, log(mel + 0.001). The first MAX_SECONDS only."""
    samples = np.asarray(samples, dtype=np.float32)[: MAX_SECONDS * SAMPLE_RATE]
    padded = np.pad(samples, (FRAME // 2, 0))
    count = (len(padded) - (FRAME + 1)) // HOP + 1
    if count <= 0:
        return torch.zeros(0, MELS)
    frames = np.lib.stride_tricks.sliding_window_view(padded, FRAME)[: count * HOP : HOP]
    window = np.hanning(FRAME + 1)[:-1].astype(np.float32)
    magnitude = np.abs(np.fft.rfft(frames * window, n=FFT, axis=-1))
    return torch.from_numpy(np.log(magnitude @ mel_filters() + MEL_FLOOR).astype(np.float32))


def soft_tokens(frames: int) -> int:
    """How many soft tokens `frames` log-mel frames become: two stride-2 convolutions, each rounding up."""
    return (frames + 3) // 4


# ---------------------------------------------------------------------------------------------------
# The tower.


def clip(x: torch.Tensor, bound: float) -> torch.Tensor:
    """The checkpoints' gradient clipping, kept in the forward pass: a clamp to +-bound (within the dtype)."""
    bound = min(bound, torch.finfo(x.dtype).max)
    return x.clamp(-bound, bound)


class Subsampling(nn.Module):
    """(T, 128) features -> (ceil(T/4), hidden): two stride-2 3x3 convolutions over (time, mel), each followed by
    a LayerNorm over its channels and a ReLU, then a linear map of each time step's (mel/4 x channels)."""

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        c0, c1 = config.subsampling_conv_channels
        self.layer0 = ConvNormReLU(1, c0, config.rms_norm_eps)
        self.layer1 = ConvNormReLU(c0, c1, config.rms_norm_eps)
        self.input_proj_linear = nn.Linear(MELS // 4 * c1, config.hidden_size, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.layer0(features[None, None]))  # (1, c1, T/4, 32)
        return self.input_proj_linear(x[0].permute(1, 2, 0).flatten(1))  # (T/4, 32 * c1), mel-major


class ConvNormReLU(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.to(self.conv.weight.dtype))
        return F.relu(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class FeedForward(nn.Module):
    """A half-step feed-forward: x + residual_weight * post_norm(ffw_2(silu(ffw_1(pre_norm(x)))))."""

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        C = config.hidden_size
        self.pre_layer_norm = Gemma4RMSNorm(C, config.rms_norm_eps)
        self.ffw_layer_1 = ClippableLinear(config, C, 4 * C)
        self.ffw_layer_2 = ClippableLinear(config, 4 * C, C)
        self.post_layer_norm = Gemma4RMSNorm(C, config.rms_norm_eps)
        self.scale, self.bound = config.residual_weight, config.gradient_clipping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(self.pre_layer_norm(clip(x, self.bound)))))
        return x + self.post_layer_norm(clip(h, self.bound)) * self.scale


class AudioAttention(nn.Module):
    """Local causal attention over each frame's window of `window` frames (itself and those before it), with a
    relative-position term and soft-capped logits, in float32."""

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        C, H = config.hidden_size, config.num_heads
        self.num_heads, self.head_dim = H, C // H
        self.window = config.attention_context_left - 1
        # the chunks' relative positions start this far from the distance itself (0 in the published config)
        self.offset = (config.attention_chunk_size + self.window) // 2 - self.window
        self.cap = config.attention_logit_cap
        self.q_scale = self.head_dim**-0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        self.q_proj = ClippableLinear(config, C, C)
        self.k_proj = ClippableLinear(config, C, C)
        self.v_proj = ClippableLinear(config, C, C)
        self.post = ClippableLinear(config, C, C)
        self.relative_k_proj = nn.Linear(C, C, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, C = x.shape
        W, H, D = self.window, self.num_heads, self.head_dim
        q = self.q_proj(x).float().view(T, H, D) * self.q_scale * F.softplus(self.per_dim_scale.float())
        k = self.k_proj(x).float().view(T, H, D) * self.k_scale
        v = self.v_proj(x).float().view(T, H, D)
        # each frame's window: frames t - W + 1 .. t, slot w at distance W - 1 - w (before the signal: zeros, masked)
        k_win = F.pad(k, (0, 0, 0, 0, W - 1, 0)).unfold(0, W, 1)  # (T, H, D, W)
        v_win = F.pad(v, (0, 0, 0, 0, W - 1, 0)).unfold(0, W, 1)
        distance = torch.arange(W - 1, -1, -1, device=x.device)
        rel = self.relative_k_proj(sinusoid(distance + self.offset, C).to(x.dtype)).float().view(W, H, D)
        logits = torch.einsum("thd,thdw->thw", q, k_win) + torch.einsum("thd,whd->thw", q, rel)
        logits = torch.tanh(logits / self.cap) * self.cap  # the logit cap
        before_start = (torch.arange(T, device=x.device)[:, None] - distance[None, :]) < 0  # (T, W)
        weights = F.softmax(logits.masked_fill(before_start[:, None, :], -1e9), dim=-1)
        y = torch.einsum("thw,thdw->thd", weights, v_win)  # (T, H, D)
        return self.post(y.reshape(T, C).to(x.dtype))


def sinusoid(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """(n,) timesteps -> (n, dim): sines then cosines at dim / 2 timescales from 1 to 10,000."""
    n = dim // 2
    inv_timescales = torch.exp(torch.arange(n, device=timesteps.device) * -(math.log(10_000.0) / max(n - 1, 1)))
    scaled = timesteps[:, None].float() * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=-1)


class LightConv(nn.Module):
    """x + linear_end(silu(conv_norm(depthwise causal conv(GLU(linear_start(pre_norm(x)))))))."""

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        C = config.hidden_size
        self.pre_layer_norm = Gemma4RMSNorm(C, config.rms_norm_eps)
        self.linear_start = ClippableLinear(config, C, 2 * C)
        self.depthwise_conv1d = nn.Conv1d(C, C, config.conv_kernel_size, groups=C, bias=False)
        self.conv_norm = Gemma4RMSNorm(C, config.rms_norm_eps)
        self.linear_end = ClippableLinear(config, C, C)
        self.bound = config.gradient_clipping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)  # (T, C)
        kernel = self.depthwise_conv1d.kernel_size[0]
        h = self.depthwise_conv1d(F.pad(h.T[None], (kernel - 1, 0)))[0].T  # causal: only frames before
        return x + self.linear_end(F.silu(self.conv_norm(clip(h, self.bound))))


class ConformerLayer(nn.Module):
    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        C, eps = config.hidden_size, config.rms_norm_eps
        self.feed_forward1 = FeedForward(config)
        self.norm_pre_attn = Gemma4RMSNorm(C, eps)
        self.self_attn = AudioAttention(config)
        self.norm_post_attn = Gemma4RMSNorm(C, eps)
        self.lconv1d = LightConv(config)
        self.feed_forward2 = FeedForward(config)
        self.norm_out = Gemma4RMSNorm(C, eps)
        self.bound = config.gradient_clipping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feed_forward1(x)
        x = x + self.norm_post_attn(clip(self.self_attn(self.norm_pre_attn(clip(x, self.bound))), self.bound))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(clip(x, self.bound))


class AudioTower(nn.Module):
    """One recording's log-mel features (T, 128) -> its soft tokens (ceil(ceil(T/2)/2), output_proj_dims)."""

    def __init__(self, config: Gemma4AudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = Subsampling(config)
        self.layers = nn.ModuleList(ConformerLayer(config) for _ in range(config.num_layers))
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != MELS or features.shape[0] == 0:
            raise ValueError(f"audio features must be (frames >= 1, {MELS}), got {tuple(features.shape)}")
        x = self.subsample_conv_projection(features.to(self.output_proj.weight.device))
        for layer in self.layers:
            x = layer(x)
        return self.output_proj(x)
