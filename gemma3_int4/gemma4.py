"""The Gemma 4 text decoder (E2B, E4B, 31B, 26B-A4B), top to bottom.

Gemma 4 keeps Gemma 3's frame (model.py: sandwich-norm blocks, sliding and full attention layers, a tied
int4-ready embedding; attention.py: their KV caches and masks) and changes what is inside. Read in order:
- RMSNorm (model.Gemma4RMSNorm) scales by w, not 1 + w, and has a scale-free variant (on the values, and in
  the router);
- attention: scale 1; full layers have their own head_dim (512) and "proportional" RoPE (a quarter of each
  head rotates); in the 31B/26B full layers K and V are one projection (k_eq_v); in E2B/E4B the last layers own
  no keys or values and attend over an earlier layer's (KV sharing);
- the block: the GeGLU MLP, beside it in 26B-A4B a mixture of 128 experts; in E2B/E4B a per-layer embedding
  gated into the residual stream after the MLP; a stored scalar on the layer's output;
- the model: per-layer embeddings computed with the token embeddings, and the final logits soft-capped at 30;
  with a vision tower (gemma4_vision.py) or an audio tower (gemma4_audio.py), the soft tokens of images and
  recordings in the prompt take the towers' embeddings.
Loading is loader.py's, as for Gemma 3; the config is config.Gemma4Config.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import gemma4_audio, gemma4_vision
from .attention import ALL, CacheWrite, Mask, allocate_caches, attend, attention_dtype, attention_masks, image_index
from .config import PAD_ID, Gemma4Config
from .model import MLP, OutputHead, Rope, TiedEmbedding, apply_rope, rope_cos_sin
from .model import Gemma4RMSNorm as RMSNorm  # shared with the towers

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values (B, n_kv, S, hd): what a layer's attention reads


class Attention(nn.Module):
    def __init__(self, config: Gemma4Config, i: int):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.layer_head_dim(i)
        self.num_kv_heads = config.layer_kv_heads(i)
        # a KV-shared layer has no keys or values of its own: it reads layer kv_source's (Gemma4.hidden_states)
        self.shares_kv = config.kv_source(i) != i
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(config.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.k_proj = self.v_proj = self.k_norm = self.v_norm = None
        if not self.shares_kv:
            self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
            if not (config.attention_k_eq_v and config.global_layers[i]):  # k_eq_v: V is K's raw projection
                self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.v_norm = RMSNorm(self.head_dim, config.rms_norm_eps, with_scale=False)
        self.kv_cache = None  # a KVCache, from Gemma4.setup_cache (not on a KV-shared layer)

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: Mask, write: CacheWrite | None, shared: KV | None
    ) -> tuple[torch.Tensor, KV]:
        """-> the output (B, T, D), and the keys and values it attended over (for the layers that share them)."""
        B, T, _ = x.shape
        dtype = attention_dtype(x.dtype, x.device)
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        q = apply_rope(q, *rope).to(dtype)  # (B, nh, T, hd)
        if self.shares_kv:
            k, v = shared
        else:
            k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
            v = k if self.v_proj is None else self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
            k = apply_rope(self.k_norm(k).transpose(1, 2), *rope).to(dtype)  # (B, n_kv, T, hd)
            v = self.v_norm(v).transpose(1, 2).to(dtype)
            if write is not None:
                k, v = self.kv_cache.update(write, k, v, mask)
        y = attend(q, k, v, mask, 1.0).type_as(x)  # (B, nh, T, hd): no scaling, the q/k norms set the scale
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), (k, v)


class Router(nn.Module):
    """Picks each token's top_k experts, from the residual stream before the MLP, and their weights."""

    def __init__(self, config: Gemma4Config):
        super().__init__()
        self.top_k = config.top_k_experts
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> each token's expert weights (float32) and expert indices, (B, T, top_k) each."""
        h = self.norm(x) * self.scale * x.shape[-1] ** -0.5
        probs = F.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)  # the chosen share 1, then each expert's own scale
        return weights * self.per_expert_scale[chosen], chosen


class Experts(nn.ModuleList):
    """num_experts GeGLU MLPs; each token runs only its chosen ones, weighted."""

    def __init__(self, config: Gemma4Config):
        super().__init__(MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        # which experts run depends on the data: eager, between compiled graphs (disabled here rather than with a
        # decorator, which would import torch._dynamo, a second or two, into every start)
        if torch.compiler.is_compiling():
            return torch.compiler.disable(self.run)(x, weights, chosen)
        return self.run(x, weights, chosen)

    def run(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        x2, out = x.flatten(0, 1), torch.zeros_like(x.flatten(0, 1))  # (B * T, D)
        weights, chosen = weights.flatten(0, 1), chosen.flatten(0, 1)  # (B * T, top_k)
        for e in chosen.unique().tolist():  # only the experts some token chose (decode: top_k of them)
            token, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, token, (self[e](x2[token]) * weights[token, slot, None]).to(out.dtype))
        return out.view_as(x)


class Block(nn.Module):
    """Gemma 3's sandwich norms, with Gemma 4's additions after the MLP (see the module docstring)."""

    def __init__(self, config: Gemma4Config, i: int):
        super().__init__()
        self.is_global = config.global_layers[i]
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_norm = RMSNorm(D, eps)
        self.attn = Attention(config, i)
        self.post_attn_norm = RMSNorm(D, eps)
        self.pre_ffw_norm = RMSNorm(D, eps)
        self.mlp = MLP(D, config.layer_intermediate_size(i))
        self.post_ffw_norm = RMSNorm(D, eps)
        self.router = self.experts = None
        if config.num_experts:  # beside the MLP, each with its own norms
            self.router = Router(config)
            self.experts = Experts(config)
            self.pre_feedforward_layernorm_2 = RMSNorm(D, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(D, eps)  # the MLP's
            self.post_feedforward_layernorm_2 = RMSNorm(D, eps)  # the experts'
        self.per_layer_input_gate = None
        if P := config.hidden_size_per_layer_input:
            self.per_layer_input_gate = nn.Linear(D, P, bias=False)
            self.per_layer_projection = nn.Linear(P, D, bias=False)
            self.post_per_layer_input_norm = RMSNorm(D, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        mask: Mask,
        write: CacheWrite | None,
        shared: KV | None,
        per_layer_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, KV]:
        y, kv = self.attn(self.input_norm(x), rope, mask, write, shared)
        h = x + self.post_attn_norm(y)
        h = h + self.post_ffw_norm(self.feed_forward(h))
        if self.per_layer_input_gate is not None:  # this layer's slice of the per-layer embeddings (B, T, P)
            gated = F.gelu(self.per_layer_input_gate(h), approximate="tanh") * per_layer_input
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return h * self.layer_scalar, kv

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.pre_ffw_norm(h))
        if self.experts is None:
            return y
        experts = self.experts(self.pre_feedforward_layernorm_2(h), *self.router(h))
        return self.post_feedforward_layernorm_1(y) + self.post_feedforward_layernorm_2(experts)


class Gemma4(nn.Module):
    def __init__(self, config: Gemma4Config):
        super().__init__()
        self.config = config
        self.embed = TiedEmbedding(config.vocab_size, config.hidden_size)
        self.embed_per_layer = self.per_layer_model_projection = None
        if P := config.hidden_size_per_layer_input:  # per-layer embeddings: L slices of P for every token
            L = config.num_layers
            self.embed_per_layer = TiedEmbedding(config.vocab_size_per_layer_input, L * P)  # only looked up
            self.per_layer_model_projection = nn.Linear(config.hidden_size, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, config.rms_norm_eps)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else OutputHead(config.hidden_size, config.vocab_size)
        self.vision = self.embed_vision = None
        if (vc := config.vision_config) is not None:  # the image tower, and its map into the embedding space
            self.vision = gemma4_vision.VisionTower(vc)
            self.embed_vision = gemma4_vision.Embedder(vc.hidden_size, config.hidden_size, vc.rms_norm_eps)
        self.audio = self.embed_audio = None
        if (ac := config.audio_config) is not None:  # the audio tower (E2B, E4B), and its map
            self.audio = gemma4_audio.AudioTower(ac)
            self.embed_audio = gemma4_vision.Embedder(ac.output_proj_dims, config.hidden_size, ac.rms_norm_eps)
        self.cache_len = self.cache_batch = 0

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Allocate the static KV caches of the layers that own keys and values (the KV-shared ones read
        theirs); afterwards forward(ids, pos) decodes incrementally."""
        allocate_caches(self, batch_size, max_seq_len, [layer for layer in self.layers if not layer.attn.shares_kv])

    def embed_tokens(self, input_ids: torch.Tensor, pixel_values: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D), scaled by sqrt(D); with per-layer embeddings (E2B, E4B), each token's
        L inputs of P (B, T, L * P) follow on the last dim, so that a prompt's chunks slice both as one:
        (the per-layer table's rows * sqrt(P) + RMSNorm(projection of the embeddings / sqrt(D))) / sqrt(2).
        pixel_values: the prompt's media, images (3, H, W) (gemma4_vision.preprocess) and recordings' log-mel
        features (frames, 128) (gemma4_audio.log_mel), each kind in reading order; their embeddings take their soft
        tokens' places, and the per-layer table reads the pad token there."""
        c = self.config
        soft = [] if pixel_values is None else self.media_embeddings(input_ids, pixel_values)
        for is_soft, _ in soft:
            input_ids = input_ids.masked_fill(is_soft, PAD_ID)
        x = self.embed.lookup(input_ids)
        x = x * torch.tensor(math.sqrt(c.hidden_size), dtype=x.dtype)  # scale rounded to x's dtype
        for is_soft, features in soft:
            x = x.masked_scatter(is_soft[..., None], features.to(x.dtype))
        if self.embed_per_layer is None:
            return x
        P = c.hidden_size_per_layer_input
        tokens = self.embed_per_layer.lookup(input_ids).to(x.dtype) * torch.tensor(math.sqrt(P), dtype=x.dtype)
        projected = self.per_layer_model_projection(x) * c.hidden_size**-0.5
        projected = self.per_layer_projection_norm(projected.unflatten(-1, (c.num_layers, P))).flatten(-2)
        return torch.cat([x, (projected + tokens) * 2**-0.5], dim=-1)

    def media_embeddings(self, input_ids: torch.Tensor, media: list[torch.Tensor]) -> list[KV]:
        """For images and then recordings, if the prompt has any: the mask of their soft tokens in input_ids
        (B, T), and their embeddings one after another (n, D), through the kind's tower and embedder."""
        vc, ac, out = self.config.vision_config, self.config.audio_config, []
        kinds = [("image", "vision", 3, self.vision, self.embed_vision, vc and vc.image_token_id),
                 ("audio", "audio", 2, self.audio, self.embed_audio, ac and ac.audio_token_id)]  # fmt: skip
        for kind, tower_name, dims, tower, embedder, soft_id in kinds:
            items = [m for m in media if m.dim() == dims]
            if not items:
                continue
            if tower is None:
                raise ValueError(f"this model has no {tower_name} tower: it takes no {kind}")
            is_soft = input_ids == soft_id
            features = torch.cat([embedder(tower(m)) for m in items])
            if features.shape[0] != int(is_soft.sum()):
                raise ValueError(f"the prompt has {int(is_soft.sum())} {kind} soft tokens, but its {len(items)} "
                                 f"{kind}(s) make {features.shape[0]}")  # fmt: skip
            out.append((is_soft, features))
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        pos: torch.Tensor | None = None,
        pixel_values: list[torch.Tensor] | None = None,
        rows: slice = ALL,
    ) -> torch.Tensor:
        """input_ids (B, T) -> float logits (B, T, vocab_size); pos and rows as Gemma3.forward's; pixel_values
        as embed_tokens'."""
        x = self.embed_tokens(input_ids, pixel_values)
        vc = self.config.vision_config
        images = None if pixel_values is None or vc is None else image_index(input_ids == vc.image_token_id)
        return self.logits(self.hidden_states(x, pos, images, rows))

    def hidden_states(
        self, x: torch.Tensor, pos: torch.Tensor | None = None, images: torch.Tensor | None = None, rows: slice = ALL
    ) -> torch.Tensor:
        """embed_tokens' output (B, T, D [+ L * P]) -> final normed hidden states (B, T, D); as Gemma3's, but the
        tokens of one image (images, from image_index) see each other both ways only on the sliding layers, and
        only where the config says so (31B, 26B-A4B): the E models read images causally."""
        c = self.config
        per_layer = None  # (B, T, L, P)
        if c.hidden_size_per_layer_input:
            x, per_layer = x[..., : c.hidden_size], x[..., c.hidden_size :].unflatten(-1, (c.num_layers, -1))
        images = images if c.vision_bidirectional else None
        q_pos, global_mask, local_mask, write = attention_masks(self, x, pos, rows, images, global_images=False)
        global_rope = rope_cos_sin(q_pos, c.global_head_dim, c.rope_theta_global, 1.0, x.dtype, c.partial_rotary_factor)
        local_rope = rope_cos_sin(q_pos, c.head_dim, c.rope_theta_local, 1.0, x.dtype)
        shared: dict[bool, KV] = {}  # is_global -> the keys and values of the last layer of that type that owns them
        for i, layer in enumerate(self.layers):
            rope, mask = (global_rope, global_mask) if layer.is_global else (local_rope, local_mask)
            ple = None if per_layer is None else per_layer[:, :, i]
            x, kv = layer(x, rope, mask, write, shared.get(layer.is_global), ple)
            if not layer.attn.shares_kv:
                shared[layer.is_global] = kv
        return self.norm(x)

    @property
    def head(self) -> nn.Module:
        return self.embed if self.lm_head is None else self.lm_head

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Soft-capped: cap * tanh(logits / cap), in float32."""
        cap = self.config.final_logit_softcapping
        return torch.tanh(self.head.unembed(h).float() / cap) * cap
