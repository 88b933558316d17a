"""The configs of Gemma 3 and Gemma 4, as dataclasses with their published sizes, each field checked where it is
made: Gemma 3's decoder (Gemma3Config, CONFIGS) and its SigLIP tower (VisionConfig); Gemma 4's decoder
(Gemma4Config, GEMMA4_CONFIGS) and its vision and audio towers; and the special token ids. Reading and writing
transformers' config.json is formats/config_json.py's. Everything else builds on this file, and it imports
nothing of ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Special token ids of Gemma 3's tokenizer (the same in every size)
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN_ID, END_OF_TURN_ID = 105, 106
STOP_IDS = (EOS_ID, END_OF_TURN_ID)
START_OF_IMAGE_ID, END_OF_IMAGE_ID = 255999, 256000
IMAGE_TOKEN_ID = 262144  # the soft token that stands for one image embedding (just past the text vocabulary)
# our state-dict prefixes of the vision tower and its projector (Gemma 3's projector, Gemma 4's embed_vision)
VISION_MODULES = ("vision.", "projector.", "embed_vision.")
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
    # Google's checkpoints tie the output head to the embedding; some requantized ones (torchao's) untie it
    tie_word_embeddings: bool = True
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
        if type(self.tie_word_embeddings) is not bool:
            raise ValueError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")

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
    def from_shapes(
        cls, shapes: dict[str, tuple[int, ...]], vision_config: VisionConfig | None = None, any_size: bool = False
    ) -> Gemma3Config:
        """The config of a checkpoint that has none, from its tensors' shapes (our names; an Orbax checkpoint's
        translated by formats/orbax.py): a published size if the shapes are one's. Else, with any_size (Orbax's
        tiny test models), what the shapes say and Gemma 3's defaults for the rest, as the published models of its
        kind have them (text-only like 1B, multimodal like 4B; query_pre_attn_scalar = head_dim). A vision tower
        has the published config unless one is given."""

        def rows(module: str) -> int:  # of a weight, dense or quantized
            return next((s[0] for k in ("weight", "int4_data", "int8_data") if (s := shapes.get(f"{module}.{k}"))), 0)

        n_layers = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("layers.")), default=-1)
        embed, norm = rows("embed"), shapes.get("norm.weight")
        head_dim = (shapes.get("layers.0.attn.q_norm.weight") or (0,))[0]
        sizes = dict(
            hidden_size=norm[0] if norm else 0,
            num_layers=n_layers,
            num_heads=rows("layers.0.attn.q_proj") // max(head_dim, 1),
            num_kv_heads=rows("layers.0.attn.k_proj") // max(head_dim, 1),
            head_dim=head_dim,
            intermediate_size=rows("layers.0.mlp.gate_proj"),
        )
        if vision_config is None and "vision.patch_embedding.weight" in shapes:
            vision_config = VisionConfig()
        found = dict(vocab_size=embed, tie_word_embeddings=not any(k.startswith("lm_head.") for k in shapes),
                     vision_config=vision_config)  # fmt: skip
        for published in CONFIGS.values():
            if embed and all(published[k] == v for k, v in sizes.items()):
                return cls(**{**published, **found})
        if not any_size:
            raise ValueError(
                f"no config.json, and the tensor shapes ({n_layers} layers, norm {norm}) "
                f"match no published Gemma 3 size ({', '.join(CONFIGS)})"
            )
        like = CONFIGS["4b" if vision_config else "1b"]
        return cls(
            **sizes,
            **found,
            sliding_window=like["sliding_window"],
            query_pre_attn_scalar=head_dim,
            rope_scale_global=like.get("rope_scale_global", 1.0),
            max_seq_len=like["max_seq_len"],
        )


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


# Gemma 4 (E2B, E4B, 31B, 26B-A4B): the text decoder's config (gemma4.py). Its tokenizer's special ids differ
# from Gemma 3's and come from the checkpoint's tokenizer files (tokenizer.py).
GEMMA4_MODEL_TYPES = ("gemma4_text", "gemma4")


# Gemma 4's multimodal token ids (transformers' Gemma4Config defaults; the same in every size)
GEMMA4_IMAGE_TOKEN_ID, GEMMA4_START_OF_IMAGE_ID, GEMMA4_END_OF_IMAGE_ID = 258880, 255999, 258882
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)  # how many soft tokens an image may become (280 by default)


@dataclass(frozen=True)
class Gemma4VisionConfig:
    """Gemma 4's vision tower (gemma4_vision.py), as published for every size (transformers' defaults)."""

    hidden_size: int = 768
    num_layers: int = 16
    num_heads: int = 12
    num_kv_heads: int = 12
    head_dim: int = 64
    intermediate_size: int = 3072
    patch_size: int = 16
    pooling_kernel_size: int = 3  # k x k patches average into one soft token
    position_embedding_size: int = 10240  # rows of each of the x and y position tables
    rope_theta: float = 100.0
    rms_norm_eps: float = 1e-6
    use_clipped_linears: bool = False  # the linears clamp their inputs and outputs to stored bounds
    standardize: bool = False  # the soft tokens are shifted and scaled by stored vectors
    max_soft_tokens: int = 280
    image_token_id: int = GEMMA4_IMAGE_TOKEN_ID

    def __post_init__(self):
        whole = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                 "patch_size", "pooling_kernel_size", "position_embedding_size", "image_token_id")  # fmt: skip
        check_fields(self, whole, ("rope_theta", "rms_norm_eps"))
        if self.num_heads % self.num_kv_heads or self.head_dim % 4:
            raise ValueError("vision config: heads must share the kv heads evenly, and head_dim divide by 4 (2D RoPE)")
        if self.max_soft_tokens not in SOFT_TOKEN_BUDGETS:
            raise ValueError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {self.max_soft_tokens!r}")


GEMMA4_AUDIO_TOKEN_ID, GEMMA4_START_OF_AUDIO_ID, GEMMA4_END_OF_AUDIO_ID = 258881, 256000, 258883
AUDIO_MODULES = ("audio.", "embed_audio.")  # our state-dict prefixes of Gemma 4's audio tower and its projection


@dataclass(frozen=True)
class Gemma4AudioConfig:
    """Gemma 4's audio tower (gemma4_audio.py, E2B and E4B), as published (transformers' defaults)."""

    hidden_size: int = 1024
    num_layers: int = 12
    num_heads: int = 8
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5  # the light convolution's, causal
    residual_weight: float = 0.5  # the feed-forwards' half step
    attention_chunk_size: int = 12
    attention_context_left: int = 13  # a frame attends to itself and the attention_context_left - 2 before it
    attention_logit_cap: float = 50.0
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536
    audio_token_id: int = GEMMA4_AUDIO_TOKEN_ID

    def __post_init__(self):
        whole = ("hidden_size", "num_layers", "num_heads", "conv_kernel_size", "attention_chunk_size",
                 "attention_context_left", "output_proj_dims", "audio_token_id")  # fmt: skip
        check_fields(self, whole, ("residual_weight", "attention_logit_cap", "rms_norm_eps", "gradient_clipping"))
        if self.hidden_size % self.num_heads or len(self.subsampling_conv_channels) != 2:
            raise ValueError("audio config: heads must divide hidden_size, and the subsampling has two convolutions")
        if (self.attention_chunk_size + self.attention_context_left - 1) // 2 < self.attention_context_left - 1:
            raise ValueError("audio config: the chunks' relative positions do not cover the left context")


@dataclass
class Gemma4Config:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # of the sliding layers, and of the full ones unless attention_k_eq_v
    head_dim: int  # of the sliding layers
    intermediate_size: int
    sliding_window: int
    global_head_dim: int = 512  # of the full-attention layers
    num_global_kv_heads: int | None = None  # of the full layers when attention_k_eq_v (None: num_kv_heads)
    attention_k_eq_v: bool = False  # full layers: no v_proj, the values are the keys' raw projection
    vocab_size: int = 262144
    rope_theta_local: float = 10_000.0
    rope_theta_global: float = 1_000_000.0
    partial_rotary_factor: float = 0.25  # full layers' "proportional" RoPE rotates this share of each head
    max_seq_len: int = 131072
    rms_norm_eps: float = 1e-6
    global_layers: list[bool] = field(default_factory=list)  # default 5:1, and the last layer is always full
    num_kv_shared_layers: int = 0  # the last layers reuse an earlier layer's keys and values (E2B, E4B)
    use_double_wide_mlp: bool = False  # the shared layers' MLP twice as wide (E2B)
    hidden_size_per_layer_input: int = 0  # per-layer embeddings' width, 0 for none (E2B, E4B: 256)
    vocab_size_per_layer_input: int = 262144
    num_experts: int = 0  # mixture of experts beside the dense MLP, 0 for none (26B-A4B: 128)
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    final_logit_softcapping: float = 30.0
    tie_word_embeddings: bool = True
    vision_config: Gemma4VisionConfig | None = None  # the vision tower (gemma4_vision.py), if the checkpoint has it
    vision_bidirectional: bool = False  # tokens of one image see each other both ways on sliding layers (31B, 26B)
    audio_config: Gemma4AudioConfig | None = None  # the audio tower (gemma4_audio.py: E2B, E4B)

    def __post_init__(self):
        whole = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                 "sliding_window", "global_head_dim", "vocab_size", "max_seq_len")  # fmt: skip
        positive = ("rope_theta_local", "rope_theta_global", "partial_rotary_factor", "rms_norm_eps",
                    "final_logit_softcapping")  # fmt: skip
        check_fields(self, whole, positive)
        if self.num_global_kv_heads is None:
            self.num_global_kv_heads = self.num_kv_heads
        check_fields(self, ("num_global_kv_heads",), ())
        for name in ("num_kv_shared_layers", "hidden_size_per_layer_input", "num_experts", "top_k_experts",
                     "moe_intermediate_size"):  # fmt: skip
            if type(value := getattr(self, name)) is not int or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if self.num_heads % self.num_kv_heads or self.num_heads % self.num_global_kv_heads:
            raise ValueError(f"{self.num_heads} attention heads do not share the kv heads evenly")
        if not self.global_layers:
            self.global_layers = [(i + 1) % 6 == 0 or i == self.num_layers - 1 for i in range(self.num_layers)]
        if len(self.global_layers) != self.num_layers or not all(type(g) is bool for g in self.global_layers):
            raise ValueError(f"global_layers must be {self.num_layers} booleans, one per layer")
        if self.num_experts and not (0 < self.top_k_experts <= self.num_experts and self.moe_intermediate_size):
            raise ValueError("a mixture of experts needs top_k_experts in 1..num_experts and moe_intermediate_size")
        if not self.num_kv_shared_layers < self.num_layers:
            raise ValueError(f"num_kv_shared_layers must be below num_layers ({self.num_layers})")
        for i in range(self.first_shared_layer, self.num_layers):
            self.kv_source(i)  # every shared layer has an earlier layer of its type to read

    @property
    def first_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    def kv_source(self, i: int) -> int:
        """The layer whose keys and values layer i attends over: its own, or for a KV-shared layer the last
        earlier unshared layer of the same type (sliding or full)."""
        if i < self.first_shared_layer:
            return i
        same_type = [j for j in range(self.first_shared_layer) if self.global_layers[j] == self.global_layers[i]]
        if not same_type:
            raise ValueError(f"KV-shared layer {i} has no earlier unshared layer of its type to read")
        return same_type[-1]

    def layer_head_dim(self, i: int) -> int:
        return self.global_head_dim if self.global_layers[i] else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        return self.num_global_kv_heads if self.global_layers[i] and self.attention_k_eq_v else self.num_kv_heads

    def layer_intermediate_size(self, i: int) -> int:
        return self.intermediate_size * (2 if self.use_double_wide_mlp and i >= self.first_shared_layer else 1)

    @classmethod
    def from_name(cls, name: str) -> Gemma4Config:
        if name not in GEMMA4_CONFIGS:
            raise ValueError(f"unknown Gemma 4 size {name!r}; known: {', '.join(GEMMA4_CONFIGS)}")
        return cls(**GEMMA4_CONFIGS[name])


def gemma4_layers(n: int, every: int) -> list[bool]:
    """Full attention every `every`-th layer, and always in the last."""
    return [(i + 1) % every == 0 or i == n - 1 for i in range(n)]


# The published Gemma 4 text decoders (transformers' convert_gemma4_weights.py _VARIANTS)
GEMMA4_CONFIGS = {
    "e2b": dict(hidden_size=1536, num_layers=35, num_heads=8, num_kv_heads=1, head_dim=256, intermediate_size=6144,
                sliding_window=512, global_layers=gemma4_layers(35, 5), num_kv_shared_layers=20,
                use_double_wide_mlp=True, hidden_size_per_layer_input=256),
    "e4b": dict(hidden_size=2560, num_layers=42, num_heads=8, num_kv_heads=2, head_dim=256, intermediate_size=10240,
                sliding_window=512, global_layers=gemma4_layers(42, 6), num_kv_shared_layers=18,
                hidden_size_per_layer_input=256),
    "31b": dict(hidden_size=5376, num_layers=60, num_heads=32, num_kv_heads=16, head_dim=256,
                intermediate_size=21504, sliding_window=1024, global_layers=gemma4_layers(60, 6),
                num_global_kv_heads=4, attention_k_eq_v=True, max_seq_len=262144),
    "26b-a4b": dict(hidden_size=2816, num_layers=30, num_heads=16, num_kv_heads=8, head_dim=256,
                    intermediate_size=2112, sliding_window=1024, global_layers=gemma4_layers(30, 6),
                    num_global_kv_heads=2, attention_k_eq_v=True, num_experts=128, top_k_experts=8,
                    moe_intermediate_size=704, max_seq_len=262144),
}  # fmt: skip
