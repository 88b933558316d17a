"""The Gemma 3 decoder, top to bottom.

Read in order: the configs with the published sizes, RMSNorm, rotary embeddings, the attention masks
(causal, sliding window, images seen both ways), the KV cache, attention, the GeGLU MLP, the
sandwich-norm block, and the model with its loader. Image prompts (4B/12B/27B) add vision.py's tower,
whose output takes the place of the image soft tokens' embeddings.
Weights are plain nn.Linear / nn.Embedding here; quant.py swaps in int4 versions from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import quant
import vision  # vision.py builds on this file, and Gemma3 holds its tower: names resolve at call time
from tokenizer import END_OF_IMAGE_ID, IMAGE_TOKEN_ID, START_OF_IMAGE_ID

TEXT_VOCAB_SIZE = 262144  # real tokens; multimodal checkpoints pad the embedding to 262208 rows


def check_fields(config, whole: tuple[str, ...], positive: tuple[str, ...]) -> None:
    """Both configs' one validation: sizes are whole numbers >= 1, scales and epsilons finite numbers > 0 (a
    string, a float size or a NaN read from a config.json would otherwise fail far from it, or silently)."""
    for name in whole:
        if type(value := getattr(config, name)) is not int or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    for name in positive:
        if type(value := getattr(config, name)) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP-So400m at 896x896, the same for every Gemma 3 vision model."""

    image_size: int = 896
    patch_size: int = 14
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    layer_norm_eps: float = 1e-6
    tokens_per_image: int = 256  # after the projector's average pooling
    image_token_id: int = IMAGE_TOKEN_ID

    def __post_init__(self):
        whole = ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "tokens_per_image", "image_token_id")  # fmt: skip
        check_fields(self, whole, ("layer_norm_eps",))
        side, pooled = self.image_size // self.patch_size, math.isqrt(self.tokens_per_image)
        if self.image_size % self.patch_size or pooled**2 != self.tokens_per_image or side % pooled:
            raise ValueError(
                f"vision config: {self.image_size}px images in {self.patch_size}px patches cannot be pooled "
                f"to {self.tokens_per_image} tokens (a square whose side divides the patch grid's)"
            )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, hf: dict) -> VisionConfig:
        """From a multimodal transformers config.json (model_type "gemma3"): its vision_config and the
        image token fields; what it omits takes transformers' defaults."""
        v = hf.get("vision_config") or {}
        if not isinstance(v, dict):
            raise ValueError(f"vision_config must be a JSON object, not {type(v).__name__}")
        if v.get("model_type", "siglip_vision_model") != "siglip_vision_model":
            raise ValueError(f"config.json: vision model {v.get('model_type')!r} is not SigLIP")
        d = cls()
        return cls(
            image_size=v.get("image_size", d.image_size),
            patch_size=v.get("patch_size", d.patch_size),
            hidden_size=v.get("hidden_size", d.hidden_size),
            num_layers=v.get("num_hidden_layers", d.num_layers),
            num_heads=v.get("num_attention_heads", d.num_heads),
            intermediate_size=v.get("intermediate_size", d.intermediate_size),
            layer_norm_eps=v.get("layer_norm_eps", d.layer_norm_eps),
            tokens_per_image=hf.get("mm_tokens_per_image", d.tokens_per_image),
            image_token_id=hf.get("image_token_index", d.image_token_id),
        )

    def to_hf(self) -> dict:
        return {
            "model_type": "siglip_vision_model",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": "gelu_pytorch_tanh",
            "vision_use_head": False,
        }


@dataclass
class Gemma3Config:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    sliding_window: int
    vocab_size: int = 262144  # embedding rows, padding included
    query_pre_attn_scalar: float = 256  # attention scale is query_pre_attn_scalar ** -0.5
    rope_theta_local: float = 10_000.0
    rope_theta_global: float = 1_000_000.0
    rope_scale_global: float = 1.0  # linear RoPE scaling on global layers: positions / rope_scale_global
    max_seq_len: int = 32768
    rms_norm_eps: float = 1e-6
    # layer i attends globally iff global_layers[i]; by default every 6th layer
    global_layers: list[bool] = field(default_factory=list)
    vision_config: VisionConfig | None = None  # the SigLIP tower of the 4B/12B/27B models (vision.py)

    def __post_init__(self):
        whole = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                 "sliding_window", "vocab_size", "max_seq_len")  # fmt: skip
        positive = (
            "query_pre_attn_scalar",
            "rope_theta_local",
            "rope_theta_global",
            "rope_scale_global",
            "rms_norm_eps",
        )
        check_fields(self, whole, positive)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} attention heads do not share {self.num_kv_heads} kv heads evenly")
        if not self.global_layers:
            self.global_layers = [(i + 1) % 6 == 0 for i in range(self.num_layers)]
        if len(self.global_layers) != self.num_layers or not all(type(g) is bool for g in self.global_layers):
            raise ValueError(f"global_layers must be {self.num_layers} booleans, one per layer")

    @property
    def qkv_sizes(self) -> list[int]:
        """Rows of q, k and v in the stacked qkv_proj weight."""
        return [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2

    @classmethod
    def from_name(cls, name: str) -> Gemma3Config:
        if name not in CONFIGS:
            raise ValueError(f"unknown Gemma 3 size {name!r}; known: {', '.join(CONFIGS)}")
        return cls(**CONFIGS[name])

    @classmethod
    def from_hf(cls, hf: dict) -> Gemma3Config:
        """From a transformers config.json: text-only `gemma3_text` or multimodal `gemma3` (text_config)."""
        model_type, vision_config = hf.get("model_type"), None
        if model_type == "gemma3":
            vision_config = VisionConfig.from_hf(hf)
            hf = hf.get("text_config") or {}
            if not isinstance(hf, dict):
                raise ValueError(f"text_config must be a JSON object, not {type(hf).__name__}")
            hf = dict(hf)
            hf.setdefault("vocab_size", 262208)  # transformers' default for the multimodal models
        elif model_type != "gemma3_text":
            raise ValueError(f"config.json: model_type {model_type!r} is not Gemma 3 ('gemma3' or 'gemma3_text')")
        for name in ("hidden_size", "num_hidden_layers", "intermediate_size"):
            if name not in hf:
                raise ValueError(f"config.json: Gemma 3 text config has no {name!r}")
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if hf.get(name) is not None:
                raise ValueError(f"config.json: {name} is set, but Gemma 3 has no logit soft-capping")
        # Fields a config.json may omit take transformers' Gemma3TextConfig defaults.
        theta_global = hf.get("rope_theta", 1_000_000.0)
        theta_local = hf.get("rope_local_base_freq", 10_000.0)
        scaling = hf.get("rope_scaling") or {}
        rope = hf.get("rope_parameters") or {}  # newer transformers: one dict per layer type
        if "full_attention" in rope:
            scaling = rope["full_attention"]
            theta_global = scaling.get("rope_theta", theta_global)
            theta_local = rope.get("sliding_attention", {}).get("rope_theta", theta_local)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ValueError(f"config.json: RoPE type {rope_type!r} is not supported (only default and linear)")
        n_layers = hf["num_hidden_layers"]
        pattern = hf.get("sliding_window_pattern", 6)
        layer_types = hf.get("layer_types") or [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)
        ]
        return cls(
            hidden_size=hf["hidden_size"],
            num_layers=n_layers,
            num_heads=hf.get("num_attention_heads", 8),
            num_kv_heads=hf.get("num_key_value_heads", 4),
            head_dim=hf.get("head_dim", 256),
            intermediate_size=hf["intermediate_size"],
            sliding_window=hf.get("sliding_window", 4096),
            vocab_size=hf.get("vocab_size", 262208),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
            rope_theta_local=theta_local,
            rope_theta_global=theta_global,
            rope_scale_global=scaling.get("factor", 1.0) if rope_type == "linear" else 1.0,
            max_seq_len=hf.get("max_position_embeddings", 131072),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            global_layers=[t == "full_attention" for t in layer_types],
            vision_config=vision_config,
        )

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> Gemma3Config:
        """Identify a published size from a state dict's shapes (our names), for checkpoints without config.json."""
        n_layers = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("layers.")), default=-1)
        embed = shapes.get("embed.weight") or shapes.get("embed.int4_data") or shapes.get("embed.int8_data")
        has_vision = "vision.patch_embedding.weight" in shapes
        for c in CONFIGS.values():
            if c["num_layers"] == n_layers and shapes.get("norm.weight") == (c["hidden_size"],) and embed:
                return cls(**{**c, "vocab_size": embed[0], "vision_config": VisionConfig() if has_vision else None})
        raise ValueError(
            f"no config.json, and the tensor shapes ({n_layers} layers, norm {shapes.get('norm.weight')}) "
            f"match no published Gemma 3 size ({', '.join(CONFIGS)})"
        )

    def to_hf(self) -> dict:
        """The config.json that transformers reads back to this config: `gemma3_text`, or with a vision
        tower the multimodal `gemma3` that holds it as its text_config."""
        text = {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "sliding_window": self.sliding_window,
            "vocab_size": self.vocab_size,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "rope_local_base_freq": self.rope_theta_local,
            "rope_theta": self.rope_theta_global,
            "rope_scaling": None
            if self.rope_scale_global == 1.0
            else {"rope_type": "linear", "factor": self.rope_scale_global},
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.rms_norm_eps,
            "layer_types": ["full_attention" if g else "sliding_attention" for g in self.global_layers],
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
            "bos_token_id": 2,
            "eos_token_id": [1, 106],
            "pad_token_id": 0,
        }
        if self.vision_config is None:
            return text
        return {
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "text_config": {k: v for k, v in text.items() if k != "architectures"},
            "vision_config": self.vision_config.to_hf(),
            "mm_tokens_per_image": self.vision_config.tokens_per_image,
            "image_token_index": self.vision_config.image_token_id,
            "boi_token_index": START_OF_IMAGE_ID,
            "eoi_token_index": END_OF_IMAGE_ID,
            "eos_token_id": [1, 106],
        }


# The published sizes (Google's configs). Vocab 262208 = 262144 tokens padded for the vision models.
CONFIGS = {
    "270m": dict(hidden_size=640, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256,
                 intermediate_size=2048, sliding_window=512, vocab_size=262144, max_seq_len=32768),
    "1b": dict(hidden_size=1152, num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256,
               intermediate_size=6912, sliding_window=512, vocab_size=262144, max_seq_len=32768),
    "4b": dict(hidden_size=2560, num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256,
               intermediate_size=10240, sliding_window=1024, vocab_size=262208, rope_scale_global=8.0,
               max_seq_len=131072, vision_config=VisionConfig()),
    "12b": dict(hidden_size=3840, num_layers=48, num_heads=16, num_kv_heads=8, head_dim=256,
                intermediate_size=15360, sliding_window=1024, vocab_size=262208, rope_scale_global=8.0,
                max_seq_len=131072, vision_config=VisionConfig()),
    "27b": dict(hidden_size=5376, num_layers=62, num_heads=32, num_kv_heads=16, head_dim=128,
                intermediate_size=21504, sliding_window=1024, vocab_size=262208, rope_scale_global=8.0,
                query_pre_attn_scalar=168, max_seq_len=131072, vision_config=VisionConfig()),
}  # fmt: skip


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


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, scale: float, dtype: torch.dtype):
    """cos, sin of shape (T, head_dim) for positions pos (T,), computed in float32 like transformers."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float) / head_dim))
    freqs = pos.float()[:, None] * (inv_freq / scale)[None, :]  # (T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # rotate-half convention
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype attention computes and caches in: PyTorch's CPU attention is several times faster in float32
    than in bf16, so float32 there; elsewhere the activations' own."""
    return torch.float32 if device.type == "cpu" else dtype


def attention_mask(
    q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None = None, same_image: torch.Tensor | None = None
) -> torch.Tensor:
    """(T, S) bool, True where query i may attend to key j: causal, or either way between tokens of one image
    (same_image, (B, 1, T, S): then the mask is (B, 1, T, S) too); and, if a window is given, not more than
    window - 1 tokens back (so an image token sees its image's later tokens however far, as in transformers)."""
    dist = q_pos[:, None] - kv_pos[None, :]  # how far back each key is from each query
    mask = dist >= 0 if same_image is None else (dist >= 0) | same_image
    return mask if window is None else mask & (dist < window)


def image_groups(is_image: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True at image soft tokens -> (B, T): which image each token belongs to (0, 1, ...: each run
    of soft tokens is one image), -1 for text tokens."""
    starts = is_image & ~F.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.cumsum(1) - 1, -1)


def same_image_mask(q_groups: torch.Tensor, kv_groups: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, S) bool, True where query and key are tokens of the same image: those attend both ways."""
    q, kv = q_groups[:, :, None], kv_groups[:, None, :]
    return ((q == kv) & (q >= 0))[:, None]


class KVCache(nn.Module):
    """Pre-allocated keys and values for one layer (fixed shapes, so the decode step compiles).

    A global layer keeps every position: slot = position. A local layer only ever looks back
    `sliding_window` tokens, so it keeps a ring buffer of that many slots (slot = position % length)
    and its memory stays flat however long the context grows.
    """

    def __init__(self, batch_size: int, length: int, num_kv_heads: int, head_dim: int, dtype, device, ring: bool):
        super().__init__()
        self.ring = ring
        shape = (batch_size, num_kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) of positions pos (T,); return the n keys and values to attend over (the
        mask's length, see filled_slots): the cache's first n slots (global, and a local one for a single
        token: the slot it takes holds the key a whole window back, which it no longer sees), or the ring's
        first n - T slots as they were followed by the T new entries (local; a chunk longer than one token would
        otherwise overwrite keys its own first queries still need)."""
        if not self.ring or k.shape[2] == 1:
            slots = pos % self.k.shape[2] if self.ring else pos
            self.k.index_copy_(2, slots, k)
            self.v.index_copy_(2, slots, v)
            return self.k[:, :, :n], self.v[:, :, :n]
        old = n - k.shape[2]
        k_all = torch.cat([self.k[:, :, :old], k], dim=2)  # (B, n_kv, n, hd)
        v_all = torch.cat([self.v[:, :, :old], v], dim=2)
        keep = min(k.shape[2], self.k.shape[2])  # only the newest `length` entries survive in the ring
        slots = pos[-keep:] % self.k.shape[2]
        self.k.index_copy_(2, slots, k[:, :, -keep:])
        self.v.index_copy_(2, slots, v[:, :, -keep:])
        return k_all, v_all


def filled_slots(upto: torch.Tensor, length: int) -> int:
    """How many of a cache's `length` slots attention reads. Slots fill in position order from 0 until a ring
    wraps, so eager reads only those holding positions < upto (a chat's 8k cache costs what its words do);
    compiled, all of them (one fixed shape, compiled once). Masks hide stale and empty slots either way."""
    return length if torch.compiler.is_compiling() else min(int(upto), length)


class Attention(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.query_pre_attn_scalar**-0.5
        # q, k and v read the same input: their weights stacked by rows (see fuse_projections) make one matmul
        self.qkv_sizes = config.qkv_sizes
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_sizes), bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)  # QK-norm, per head
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x, rope, mask, pos=None):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = self.q_norm(q.view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dtype = attention_dtype(x.dtype, x.device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if pos is not None:
            k, v = self.kv_cache.update(pos, k, v, mask.shape[-1])  # (B, n_kv, S, hd): the keys the mask covers
        if T == 1 and self.num_kv_heads > 1:  # decode: each kv head's query heads as its queries (B, n_kv, g, hd),
            q = q.view(B, self.num_kv_heads, -1, self.head_dim)  # so no copy of the cache repeated per query head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True).type_as(x)
        return self.o_proj(y.reshape(B, self.num_heads, T, self.head_dim).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)  # stacked
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

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
        self.mlp = MLP(config)
        self.post_ffw_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, mask, pos=None):
        h = x + self.post_attn_norm(self.attn(self.input_norm(x), rope, mask, pos))
        return h + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(h)))


class TiedEmbedding(nn.Embedding):
    """The token embedding, which is also the output head (tied weights). quant.QuantLinear has the same
    lookup/unembed pair, so an int4 embedding drops in."""

    def reset_parameters(self) -> None:
        pass  # no random init: the weights always come from a checkpoint (and normal_ is slow on the meta device)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self(ids)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Gemma3(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.embed = TiedEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, g) for g in config.global_layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision = vision.VisionEncoder(config.vision_config, config.hidden_size) if config.vision_config else None
        self.cache_len = self.cache_batch = 0

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Allocate the static KV cache; afterwards forward(ids, pos) decodes incrementally."""
        c = self.config
        if max_seq_len > c.max_seq_len:
            raise ValueError(f"a cache of {max_seq_len} tokens exceeds the model's context of {c.max_seq_len}")
        device = self.norm.weight.device
        dtype = attention_dtype(self.norm.weight.dtype, device)
        ring = min(c.sliding_window, max_seq_len)
        for layer in self.layers:
            length = max_seq_len if layer.is_global else ring
            layer.attn.kv_cache = KVCache(
                batch_size, length, c.num_kv_heads, c.head_dim, dtype, device, ring=not layer.is_global
            )
        # the position held in each ring slot; never-written slots lie a whole window back, outside every window
        self.register_buffer("ring_pos", torch.full((ring,), -c.sliding_window, device=device), persistent=False)
        self.cache_len, self.cache_batch = max_seq_len, batch_size

    def embed_tokens(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D), scaled by sqrt(D). With pixel_values (N, 3, S, S), the image soft tokens
        take the N images' features instead (vision.py; not scaled), image after image in reading order."""
        if pixel_values is None:
            x = self.embed.lookup(input_ids)
            return x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)  # scale rounded to x's dtype
        if self.vision is None:
            raise ValueError("this model has no vision tower: it takes text only (images need Gemma 3 4B, 12B or 27B)")
        is_image = input_ids == self.config.vision_config.image_token_id
        features = self.vision(pixel_values)  # (N, tokens_per_image, D)
        if int(is_image.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"the prompt has {int(is_image.sum())} image soft tokens, but {features.shape[0]} image(s) "
                f"need {features.shape[1]} each"
            )
        x = self.embed_tokens(input_ids.masked_fill(is_image, 0))
        return x.masked_scatter(is_image[..., None], features.to(x.dtype))

    def image_groups(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T): which image each token of input_ids belongs to, -1 for text (see hidden_states)."""
        return image_groups(input_ids == self.config.vision_config.image_token_id)

    def forward(
        self, input_ids: torch.Tensor, pos: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (B, T) -> float logits (B, T, vocab_size).

        pos=None: a plain causal forward at positions 0..T-1, no cache.
        pos (T,): the tokens' positions, continuing the cached sequence (or 0.. to start a new one); their
        keys/values are written to the cache and attention reads it (see hidden_states).
        pixel_values (N, 3, S, S): the images whose soft tokens input_ids holds (vision.preprocess makes them).
        """
        x = self.embed_tokens(input_ids, pixel_values)
        groups = None if pixel_values is None else self.image_groups(input_ids)
        return self.logits(self.hidden_states(x, pos, groups))

    def hidden_states(
        self, x: torch.Tensor, pos: torch.Tensor | None = None, image_groups: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Input embeddings (B, T, D) -> final normed hidden states (B, T, D).

        image_groups (B, T), from image_groups(): the tokens of one image attend to each other both ways
        (causal elsewhere). An image must lie whole within one call (generation.prefill sees to that).
        """
        c = self.config
        if pos is None:  # a plain causal forward: keys are the queries' own positions
            q_pos = kv_global = kv_local = torch.arange(x.shape[1], device=x.device)
        else:
            if self.cache_len == 0:
                raise RuntimeError("call setup_cache(batch_size, max_seq_len) before decoding with positions")
            q_pos, ring_len = pos, self.ring_pos.shape[0]
            kv_global = torch.arange(filled_slots(pos[-1] + 1, self.cache_len), device=x.device)  # slot = position
            # local caches: the ring as it was, then this chunk (see KVCache.update). Ring entries at or past
            # pos[0] are stale, left by an earlier sequence in a reused cache: move them out of the window.
            # (So a chunk either continues where the last one ended or starts a new sequence at 0: a ring
            # cannot rewind, it has already overwritten what the rewound queries would need.)
            ring = self.ring_pos.masked_fill(self.ring_pos >= pos[0], -c.sliding_window)
            if x.shape[1] == 1:  # one token: it is written into its ring slot before attending (KVCache.update)
                kv_local = ring.index_copy(0, pos % ring_len, pos)[: filled_slots(pos[0] + 1, ring_len)]
            else:
                kv_local = torch.cat([ring[: filled_slots(pos[0], ring_len)], pos])
        same_image_global = same_image_local = None
        if image_groups is not None:  # the keys' images: only this call's own tokens can share one with a query
            if pos is None:
                kv_groups_global = kv_groups_local = image_groups
            else:
                kv_groups_global = torch.full((x.shape[0], kv_global.shape[0]), -1, device=x.device)
                kv_groups_global = kv_groups_global.index_copy(1, pos, image_groups)
                kv_groups_local = F.pad(image_groups, (kv_local.shape[0] - x.shape[1], 0), value=-1)  # ring, chunk
            same_image_global = same_image_mask(image_groups, kv_groups_global)
            same_image_local = same_image_mask(image_groups, kv_groups_local)
        global_mask = attention_mask(q_pos, kv_global, same_image=same_image_global)
        local_mask = attention_mask(q_pos, kv_local, c.sliding_window, same_image_local)
        rope_global = rope_cos_sin(q_pos, c.head_dim, c.rope_theta_global, c.rope_scale_global, x.dtype)
        rope_local = rope_cos_sin(q_pos, c.head_dim, c.rope_theta_local, 1.0, x.dtype)
        for layer in self.layers:
            if layer.is_global:
                x = layer(x, rope_global, global_mask, pos)
            else:
                x = layer(x, rope_local, local_mask, pos)
        if pos is not None:
            keep = pos[-self.ring_pos.shape[0] :]
            self.ring_pos.index_copy_(0, keep % self.ring_pos.shape[0], keep)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.embed.unembed(h).float()
        if self.config.vocab_size > TEXT_VOCAB_SIZE:  # padding rows are never valid outputs
            logits[..., TEXT_VOCAB_SIZE:] = float("-inf")
        return logits

    @classmethod
    def from_tensors(
        cls,
        config: Gemma3Config,
        tensors: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
    ) -> Gemma3:
        """The model holding a state dict in our names as it is: dense weights, or int4/int8 pairs (the layers
        become Int4Linear / Int8Linear); float tensors cast to `dtype`."""
        tensors = fuse_projections(tensors, config.num_layers)
        with torch.device("meta"):
            model = cls(config)
        quant.replace_linears(model, tensors)
        check_state_dict(model, tensors)
        model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, assign=True)
        return model.to(device).eval().requires_grad_(False)  # for inference: no autograd graph, whoever calls it

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
        weights: str = "auto",
    ) -> Gemma3:
        """Load a checkpoint directory, a .safetensors or .gguf file, or a hub repo id.

        weights="auto":  int4 stays int4, dense weights are quantized to int4 (round to nearest, group 32),
                         GGUF tensors stored at more than 4 bits become int8 (see gguf_format.py), and
                         an int8 head ranks the vocabulary with an int4 copy first (Int8Linear.unembed);
        weights="int4":  every linear weight int4;  weights="dense": every weight a float tensor of `dtype`.
        The vision tower and projector (4B/12B/27B) keep their float weights, in `dtype`.
        """
        path = checkpoint.resolve(path_or_hub_id)  # once: a hub id is looked up (downloaded) here
        config, tensors, above_4_bits = load_checkpoint(path)
        # stacked here, so that the unstacked copies are freed before the model is built and packed
        tensors = fuse_projections(convert_weights(tensors, weights, above_4_bits), config.num_layers)
        model = cls.from_tensors(config, tensors, dtype, device)
        if weights == "auto" and isinstance(model.embed, quant.Int8Linear):  # an int8 head: rank with int4 first
            head = model.embed  # its ranker is cached by the default model's conversion
            head.add_ranker(checkpoint.read_ranker(path, head.out_features, head.in_features))
        return quant.use_cpu_kernels(model)


def load_checkpoint(path_or_hub_id: str | Path) -> tuple[Gemma3Config, dict[str, torch.Tensor], set[str]]:
    """Config, tensors as stored (our names) and the GGUF weights stored above 4 bits, of any checkpoint."""
    hf_config, tensors, above_4_bits = checkpoint.load_weights(path_or_hub_id)
    if hf_config is None:  # no config.json: recognise a published size by its shapes
        return Gemma3Config.from_shapes({k: tuple(t.shape) for k, t in tensors.items()}), tensors, above_4_bits
    try:
        config = Gemma3Config.from_hf(hf_config)
    except (ValueError, TypeError) as e:  # TypeError: a field of the wrong type
        where = "GGUF metadata" if str(path_or_hub_id).endswith(".gguf") else "config.json"
        raise ValueError(f"{path_or_hub_id}: {where}: {str(e).removeprefix('config.json: ')}") from None
    return config, tensors, above_4_bits


def convert_weights(tensors: dict[str, torch.Tensor], weights: str, above_4_bits: set[str]) -> dict[str, torch.Tensor]:
    """The weights policy (quant.convert_state_dict) applied to the language model; the vision tower is
    left as it is (the checkpoints keep it bf16, and its 4096-token passes are compute-bound anyway)."""
    vision_tensors = {k: v for k, v in tensors.items() if k.startswith("vision.")}
    text_tensors = {k: v for k, v in tensors.items() if k not in vision_tensors}
    return quant.convert_state_dict(text_tensors, weights, above_4_bits) | vision_tensors


def check_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor the model needs is present with its shape and a dtype fit for its role (int8 for quantized
    data, floating point for the rest), float tensors hold no NaN or infinity, and nothing else is there: errors
    name the tensor."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}")
    for name, want in expected.items():
        t = tensors[name]
        if t.shape != want.shape:
            raise ValueError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(want.shape)}")
        if t.dtype != want.dtype and not (t.is_floating_point() and want.is_floating_point()):
            role = "floating point" if want.is_floating_point() else str(want.dtype).removeprefix("torch.")
            raise ValueError(f"tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}, expected {role}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name} holds NaN or infinite values")


# Checkpoints store q, k, v (and gate, up) as separate weights; the model holds each group stacked by rows, so
# that one matmul reads them all. Every format stacks row by row: int4/int8 data and their per-row scales alike.
FUSED = {
    "attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
KINDS = ("int4_data", "int8_data", "weight")  # from the narrowest to the widest


def fuse_projections(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A state dict in the checkpoints' names -> the model's: each layer's q/k/v and gate/up weights stacked into
    qkv_proj and gate_up_proj (already stacked ones pass). A group mixing kinds is stacked in its widest: a GGUF's
    int8 v_proj beside int4 q and k makes all three int8 (per-row, finer than int4's steps)."""
    out = dict(tensors)
    for i, fused in ((i, f) for i in range(num_layers) for f in FUSED):
        parts = [f"layers.{i}.{p}" for p in FUSED[fused]]
        kinds = [next((k for k in KINDS if f"{p}.{k}" in tensors), None) for p in parts]
        if all(k is None for k in kinds):
            continue  # already stacked, or not there at all (check_state_dict names what is missing)
        if None in kinds:
            missing = [f"{p}.weight" for p, k in zip(parts, kinds, strict=True) if k is None]
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing)}")
        kind = max(kinds, key=KINDS.index)
        stacked = [as_kind(out, p, k, kind) for p, k in zip(parts, kinds, strict=True)]
        for j, name in enumerate(("weight",) if kind == "weight" else (kind, "scales")):
            out[f"layers.{i}.{fused}.{name}"] = torch.cat([pieces[j] for pieces in stacked])
    return out


def as_kind(tensors: dict[str, torch.Tensor], module: str, kind: str, target: str) -> tuple[torch.Tensor, ...]:
    """Pop module's weight (kind: "int4_data", "int8_data" or "weight") from tensors, converted to target's kind:
    (weight,) or (data, scales)."""
    w = tensors.pop(f"{module}.{kind}")
    if kind != "weight":
        scales = tensors.pop(f"{module}.scales")
        if kind == target:
            return w, scales
        w = quant.FORMATS[kind][2](w, scales.float())  # dequantized, float32
    return (w,) if target == "weight" else quant.FORMATS[target][1](w)


def split_projections(tensors: dict[str, torch.Tensor], config: Gemma3Config) -> dict[str, torch.Tensor]:
    """The inverse of fuse_projections: stacked qkv_proj / gate_up_proj tensors back to the checkpoints' names."""
    sizes = {"attn.qkv_proj": config.qkv_sizes, "mlp.gate_up_proj": [config.intermediate_size] * 2}
    out = {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        layer, _, fused = module.partition(".")[2].partition(".")
        if not (name.startswith("layers.") and fused in FUSED):
            out[name] = t
            continue
        for part, piece in zip(FUSED[fused], t.split(sizes[fused]), strict=True):
            out[f"layers.{layer}.{part}.{kind}"] = piece
    return out
