"""The Gemma 3 decoder, top to bottom.

Read in order: RMSNorm, rotary embeddings, attention, the GeGLU MLP, the sandwich-norm block, the projector
that maps the vision tower's output into the embedding space, and the model. The masks, the KV cache and its
ring buffers, and attend are attention.py's (Gemma 4's decoder shares them). Image prompts (4B/12B/27B) add
vision.py's tower, whose projected output takes the place of the image soft tokens' embeddings. The configs
are config.py's; loading a checkpoint into this model (with q/k/v and gate/up stacked) is loader.py's.
Weights are plain nn.Linear / nn.Embedding here; quant.py swaps in int4 versions from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import vision
from .attention import ALL, CacheWrite, Mask, allocate_caches, attend, attention_dtype, attention_masks, image_index
from .config import TEXT_VOCAB_SIZE, Gemma3Config, VisionConfig


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, scaled by (1 + weight), cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).type_as(x)


class Gemma4RMSNorm(nn.Module):
    """Gemma 4's RMSNorm (its decoder's and its towers'): computed in float32, scaled by weight (no 1 +), or not
    scaled at all."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return (x32 if self.weight is None else x32 * self.weight.float()).type_as(x)


Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (B, 1, T, head_dim) each


def rope_cos_sin(
    pos: torch.Tensor, head_dim: int, theta: float, scale: float, dtype: torch.dtype, rotated: float = 1.0
) -> Rope:
    """cos, sin of shape (B, 1, T, head_dim) for positions pos (B, T), computed in float32 like transformers.
    rotated < 1 ("proportional" RoPE, Gemma 4's full layers): only the first rotated * head_dim / 2 frequencies
    turn, the rest are 0 (cos 1, sin 0), so those dimensions pass through unrotated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float) / head_dim))
    inv_freq[int(rotated * head_dim // 2) :] = 0.0
    freqs = pos.float()[..., None] * (inv_freq / scale)  # (B, T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # one for all heads
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # rotate-half convention
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.query_pre_attn_scalar**-0.5
        # q, k and v read the same input: their weights stacked by rows (loader.fuse_projections) make one matmul
        self.qkv_sizes = config.qkv_sizes
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_sizes), bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)  # QK-norm, per head
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.kv_cache = None  # a KVCache, from Gemma3.setup_cache

    def forward(self, x: torch.Tensor, rope: Rope, mask: Mask, write: CacheWrite | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). write: where its keys and values go in the KV cache (None: no cache)."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = self.q_norm(q.view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dtype = attention_dtype(x.dtype, x.device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if write is not None:  # (B, n_kv, S, hd): the keys the masks cover
            k, v = self.kv_cache.update(write, k, v, mask)
        y = attend(q, k, v, mask, self.scale).type_as(x)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)  # stacked
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    """Sandwich norms: each sub-layer's output is normalised again before the residual add."""

    def __init__(self, config: Gemma3Config, is_global: bool):
        super().__init__()
        self.is_global = is_global
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_ffw_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.post_ffw_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: Rope, mask: Mask, write: CacheWrite | None = None) -> torch.Tensor:
        h = x + self.post_attn_norm(self.attn(self.input_norm(x), rope, mask, write))
        return h + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(h)))


class Projector(nn.Module):
    """The vision tower's patch grid (N, 64*64, C) -> average-pooled 16x16 grid, RMSNorm, projected into the
    embedding space: (N, 256, D), the image soft tokens' embeddings."""

    def __init__(self, config: VisionConfig, text_hidden_size: int):
        super().__init__()
        self.patches_per_side = config.patches_per_side
        self.pool = config.patches_per_side // math.isqrt(config.tokens_per_image)
        self.mm_soft_emb_norm = RMSNorm(config.hidden_size, config.layer_norm_eps)
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(config.hidden_size, text_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, _, C = x.shape
        grid = x.transpose(1, 2).reshape(N, C, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)  # (N, tokens_per_image, C)
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).type_as(x)


class TiedEmbedding(nn.Embedding):
    """The token embedding, which is also the output head (tied weights; untied checkpoints have an OutputHead
    too, and only look up here). quant.QuantLinear has the same lookup/unembed pair, so an int4 embedding drops in."""

    def reset_parameters(self) -> None:
        pass  # no random init: the weights always come from a checkpoint (and normal_ is slow on the meta device)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self(ids)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class OutputHead(nn.Linear):
    """An output head of its own, for checkpoints that untie it from the embedding (tie_word_embeddings false);
    quantized like any linear layer."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def reset_parameters(self) -> None:
        pass  # as TiedEmbedding's

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


class Gemma3(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.embed = TiedEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, g) for g in config.global_layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else OutputHead(config.hidden_size, config.vocab_size)
        self.vision = self.projector = None
        if config.vision_config is not None:
            self.vision = vision.VisionTower(config.vision_config)
            self.projector = Projector(config.vision_config, config.hidden_size)
        self.cache_len = self.cache_batch = 0

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Allocate the static KV cache; afterwards forward(ids, pos) decodes incrementally."""
        allocate_caches(self, batch_size, max_seq_len, self.layers)

    def embed_tokens(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D), scaled by sqrt(D). With pixel_values (N, 3, S, S), the image soft tokens
        take the N images' features instead (vision.py; not scaled), image after image in reading order."""
        if pixel_values is None:
            x = self.embed.lookup(input_ids)
            return x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)  # scale rounded to x's dtype
        if self.vision is None:
            raise ValueError("this model has no vision tower: it takes text only (images need Gemma 3 4B, 12B or 27B)")
        is_image = input_ids == self.config.vision_config.image_token_id
        features = self.projector(self.vision(pixel_values))  # (N, tokens_per_image, D)
        if int(is_image.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"the prompt has {int(is_image.sum())} image soft tokens, but {features.shape[0]} image(s) "
                f"need {features.shape[1]} each"
            )
        x = self.embed_tokens(input_ids.masked_fill(is_image, 0))
        return x.masked_scatter(is_image[..., None], features.to(x.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        pos: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        rows: slice = ALL,
    ) -> torch.Tensor:
        """input_ids (B, T) -> float logits (B, T, vocab_size).

        pos=None: a plain causal forward at positions 0..T-1, no cache.
        pos (B, T), or (T,) for every row alike: each row's positions, continuing the sequence its cache row
        holds (or 0.. to start a new one); their keys/values are written to the cache and attention reads it
        (see hidden_states). rows: which of the cache's rows (sequences) the B inputs are, all by default. Rows of
        a batch may be at different positions (batched decoding: each row a request of its own).
        pixel_values (N, 3, S, S): the images whose soft tokens input_ids holds (vision.preprocess makes them).
        """
        x = self.embed_tokens(input_ids, pixel_values)
        images = None if pixel_values is None else image_index(input_ids == self.config.vision_config.image_token_id)
        return self.logits(self.hidden_states(x, pos, images, rows))

    def hidden_states(
        self, x: torch.Tensor, pos: torch.Tensor | None = None, images: torch.Tensor | None = None, rows: slice = ALL
    ) -> torch.Tensor:
        """Input embeddings (B, T, D) -> final normed hidden states (B, T, D).

        images (B, T), from image_index(): the tokens of one image attend to each other both ways (causal
        elsewhere). An image must lie whole within one call (generation.prefill sees to that).
        """
        c = self.config
        q_pos, global_mask, local_mask, write = attention_masks(self, x, pos, rows, images)
        global_rope = rope_cos_sin(q_pos, c.head_dim, c.rope_theta_global, c.rope_scale_global, x.dtype)
        local_rope = rope_cos_sin(q_pos, c.head_dim, c.rope_theta_local, 1.0, x.dtype)
        for layer in self.layers:
            if layer.is_global:
                x = layer(x, global_rope, global_mask, write)
            else:
                x = layer(x, local_rope, local_mask, write)
        return self.norm(x)

    @property
    def head(self) -> nn.Module:
        """The output head: the embedding itself (tied), or lm_head."""
        return self.embed if self.lm_head is None else self.lm_head

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head.unembed(h).float()
        if self.config.vocab_size > TEXT_VOCAB_SIZE:  # padding rows are never valid outputs
            logits[..., TEXT_VOCAB_SIZE:] = float("-inf")
        return logits
