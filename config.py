"""The configs: Gemma 3's published sizes, the mapping from transformers' config.json, and the special token
ids. Everything else builds on this file, and it imports nothing of ours.
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
VISION_MODULES = ("vision.", "projector.")  # our state-dict prefixes of the vision tower and its projector
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
            raise ValueError(f"vision model {v.get('model_type')!r} is not SigLIP")
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
    def from_hf(cls, hf: dict) -> Gemma3Config:
        """From a transformers config.json: text-only `gemma3_text` or multimodal `gemma3` (text_config)."""
        model_type, vision_config = hf.get("model_type"), None
        untied_at_top = hf.get("tie_word_embeddings") is False  # a multimodal config says it here or in text_config
        if model_type == "gemma3":
            vision_config = VisionConfig.from_hf(hf)
            hf = hf.get("text_config") or {}
            if not isinstance(hf, dict):
                raise ValueError(f"text_config must be a JSON object, not {type(hf).__name__}")
            hf = dict(hf)
            hf.setdefault("vocab_size", 262208)  # transformers' default for the multimodal models
        elif model_type != "gemma3_text":
            raise ValueError(f"model_type {model_type!r} is not Gemma 3 ('gemma3' or 'gemma3_text')")
        for name in ("hidden_size", "num_hidden_layers", "intermediate_size"):
            if name not in hf:
                raise ValueError(f"Gemma 3 text config has no {name!r}")
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if hf.get(name) is not None:
                raise ValueError(f"{name} is set, but Gemma 3 has no logit soft-capping")
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
            raise ValueError(f"RoPE type {rope_type!r} is not supported (only default and linear)")
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
            tie_word_embeddings=False if untied_at_top else hf.get("tie_word_embeddings", True),
            vision_config=vision_config,
        )

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> Gemma3Config:
        """Identify a published size from a state dict's shapes (our names), for checkpoints without config.json."""
        n_layers = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("layers.")), default=-1)
        embed = shapes.get("embed.weight") or shapes.get("embed.int4_data") or shapes.get("embed.int8_data")
        has_vision = "vision.patch_embedding.weight" in shapes
        untied = any(k.startswith("lm_head.") for k in shapes)
        for c in CONFIGS.values():
            if c["num_layers"] == n_layers and shapes.get("norm.weight") == (c["hidden_size"],) and embed:
                found = {"vocab_size": embed[0], "tie_word_embeddings": not untied}
                return cls(**{**c, **found, "vision_config": VisionConfig() if has_vision else None})
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
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": BOS_ID,
            "eos_token_id": list(STOP_IDS),
            "pad_token_id": PAD_ID,
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
            "tie_word_embeddings": self.tie_word_embeddings,
            "boi_token_index": START_OF_IMAGE_ID,
            "eoi_token_index": END_OF_IMAGE_ID,
            "eos_token_id": list(STOP_IDS),
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
