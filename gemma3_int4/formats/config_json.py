"""transformers' config.json <-> our configs (config.py): `from_hf` reads Gemma 3's (`gemma3_text`, or the
multimodal `gemma3` with its SigLIP vision_config) and Gemma 4's (`gemma4_text`, or `gemma4` with its vision and
audio configs), giving what a file omits transformers' defaults; `to_hf` writes the config.json that transformers
reads back to the same config. Gemma 3's functions first, then Gemma 4's.
"""

from __future__ import annotations

from ..config import (
    BOS_ID,
    END_OF_IMAGE_ID,
    GEMMA4_MODEL_TYPES,
    PAD_ID,
    START_OF_IMAGE_ID,
    STOP_IDS,
    Gemma3Config,
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4VisionConfig,
    VisionConfig,
)

# The towers' configs: the fields config.json stores as they are, or under transformers' name (RENAMED).
RENAMED = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads"}
SIGLIP_FIELDS = ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "layer_norm_eps")  # fmt: skip
GEMMA4_VISION_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                        "patch_size", "pooling_kernel_size", "position_embedding_size", "rms_norm_eps",
                        "use_clipped_linears", "standardize")  # fmt: skip
AUDIO_FIELDS = ("hidden_size", "num_layers", "num_heads", "subsampling_conv_channels", "conv_kernel_size",
                "residual_weight", "attention_chunk_size", "attention_context_left", "attention_logit_cap",
                "use_clipped_linears", "rms_norm_eps", "gradient_clipping", "output_proj_dims")  # fmt: skip


def tower_from_hf(hf_tower: dict, defaults, fields: tuple[str, ...]) -> dict:
    """Those fields of a tower's config.json object, each taking `defaults`' (transformers') where it is omitted."""
    return {f: hf_tower.get(RENAMED.get(f, f), getattr(defaults, f)) for f in fields}


def tower_to_hf(tower, fields: tuple[str, ...]) -> dict:
    return {RENAMED.get(f, f): getattr(tower, f) for f in fields}


def from_hf(hf: dict) -> Gemma3Config | Gemma4Config:
    """Our config of a config.json: Gemma 4's for its model types, else Gemma 3's (which names a wrong type)."""
    return gemma4_from_hf(hf) if hf.get("model_type") in GEMMA4_MODEL_TYPES else gemma3_from_hf(hf)


def to_hf(config: Gemma3Config | Gemma4Config) -> dict:
    return gemma4_to_hf(config) if isinstance(config, Gemma4Config) else gemma3_to_hf(config)


def gemma3_from_hf(hf: dict) -> Gemma3Config:
    """From a transformers config.json: text-only `gemma3_text` or multimodal `gemma3` (text_config)."""
    model_type, vision_config = hf.get("model_type"), None
    untied_at_top = hf.get("tie_word_embeddings") is False  # a multimodal config says it here or in text_config
    if model_type == "gemma3":
        vision_config = vision_from_hf(hf)
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
    return Gemma3Config(
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


def gemma3_to_hf(c: Gemma3Config) -> dict:
    """The config.json that transformers reads back to this config: `gemma3_text`, or with a vision
    tower the multimodal `gemma3` that holds it as its text_config."""
    text = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "sliding_window": c.sliding_window,
        "vocab_size": c.vocab_size,
        "query_pre_attn_scalar": c.query_pre_attn_scalar,
        "rope_local_base_freq": c.rope_theta_local,
        "rope_theta": c.rope_theta_global,
        "rope_scaling": None if c.rope_scale_global == 1.0 else {"rope_type": "linear", "factor": c.rope_scale_global},
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.rms_norm_eps,
        "layer_types": ["full_attention" if g else "sliding_attention" for g in c.global_layers],
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": list(STOP_IDS),
        "pad_token_id": PAD_ID,
    }
    if c.vision_config is None:
        return text
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": {k: v for k, v in text.items() if k != "architectures"},
        "vision_config": vision_to_hf(c.vision_config),
        "mm_tokens_per_image": c.vision_config.tokens_per_image,
        "image_token_index": c.vision_config.image_token_id,
        "tie_word_embeddings": c.tie_word_embeddings,
        "boi_token_index": START_OF_IMAGE_ID,
        "eoi_token_index": END_OF_IMAGE_ID,
        "eos_token_id": list(STOP_IDS),
    }


def vision_from_hf(hf: dict) -> VisionConfig:
    """From a multimodal transformers config.json (model_type "gemma3"): its vision_config and the
    image token fields; what it omits takes transformers' defaults."""
    v = hf.get("vision_config") or {}
    if not isinstance(v, dict):
        raise ValueError(f"vision_config must be a JSON object, not {type(v).__name__}")
    if v.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ValueError(f"vision model {v.get('model_type')!r} is not SigLIP")
    d = VisionConfig()
    tokens = hf.get("mm_tokens_per_image", d.tokens_per_image)
    image_token_id = hf.get("image_token_index", d.image_token_id)
    return VisionConfig(**tower_from_hf(v, d, SIGLIP_FIELDS), tokens_per_image=tokens, image_token_id=image_token_id)


def vision_to_hf(v: VisionConfig) -> dict:
    return {"model_type": "siglip_vision_model", **tower_to_hf(v, SIGLIP_FIELDS), "hidden_act": "gelu_pytorch_tanh",
            "vision_use_head": False}  # fmt: skip


def gemma4_from_hf(hf: dict) -> Gemma4Config:
    """From a transformers config.json: text-only `gemma4_text`, or the multimodal `gemma4`: its text_config and
    vision_config and audio_config. Older files give the full layers' head_dim
    and kv heads as global_head_dim / num_global_key_value_heads, newer ones as per_layer_config (both read)."""
    model_type = hf.get("model_type")
    untied_at_top = hf.get("tie_word_embeddings") is False
    vision_config = audio_config = None
    if model_type == "gemma4":
        vision_config = gemma4_vision_from_hf(hf) if hf.get("vision_config") is not None else None
        audio_config = gemma4_audio_from_hf(hf) if hf.get("audio_config") is not None else None
        hf = hf.get("text_config") or {}
        if not isinstance(hf, dict):
            raise ValueError(f"text_config must be a JSON object, not {type(hf).__name__}")
    elif model_type != "gemma4_text":
        raise ValueError(f"model_type {model_type!r} is not Gemma 4 ('gemma4' or 'gemma4_text')")
    for name in ("hidden_size", "num_hidden_layers", "intermediate_size"):
        if name not in hf:
            raise ValueError(f"Gemma 4 text config has no {name!r}")
    if hf.get("use_bidirectional_attention") == "all":
        raise ValueError("use_bidirectional_attention 'all' is an encoder's setting, not a decoder's")
    if hf.get("attn_logit_softcapping") is not None:
        raise ValueError("attn_logit_softcapping is set, but Gemma 4 has no attention soft-capping")
    n_layers = hf["num_hidden_layers"]
    layer_types = list(hf.get("layer_types") or [])
    if layer_types and len(layer_types) != n_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {n_layers} layers")
    global_layers = [t == "full_attention" for t in layer_types] or [(i + 1) % 6 == 0 for i in range(n_layers)]
    global_layers[-1] = True  # as transformers forces it
    rope = hf.get("rope_parameters") or {}
    local, full = rope.get("sliding_attention") or {}, rope.get("full_attention") or {}
    for kind, params, expected in (("sliding", local, "default"), ("full", full, "proportional")):
        if params.get("rope_type", expected) != expected or params.get("factor", 1.0) != 1.0:
            raise ValueError(f"{kind} layers' RoPE {params} is not supported (only Gemma 4's {expected})")
    global_head_dim = hf.get("global_head_dim", 512)
    global_kv_heads = hf.get("num_global_key_value_heads")
    overrides = hf.get("per_layer_config") or {}
    if overrides:
        if not isinstance(overrides, dict) or not all(isinstance(o, dict) for o in overrides.values()):
            raise ValueError("per_layer_config must map layer indices to objects")
        full_overrides = [o for i, o in overrides.items() if str(i).isdigit() and int(i) < n_layers
                          and global_layers[int(i)]]  # fmt: skip
        if len(full_overrides) != len(overrides) or any(o != full_overrides[0] for o in full_overrides):
            raise ValueError("per_layer_config: we read one head_dim / kv heads override for all full layers")
        global_head_dim = full_overrides[0].get("head_dim", global_head_dim)
        global_kv_heads = full_overrides[0].get("num_key_value_heads", global_kv_heads)
    k_eq_v = hf.get("attention_k_eq_v", False)
    return Gemma4Config(
        hidden_size=hf["hidden_size"],
        num_layers=n_layers,
        num_heads=hf.get("num_attention_heads", 8),
        num_kv_heads=hf.get("num_key_value_heads", 4),
        head_dim=hf.get("head_dim", 256),
        intermediate_size=hf["intermediate_size"],
        sliding_window=hf.get("sliding_window", 512),
        global_head_dim=global_head_dim,
        num_global_kv_heads=global_kv_heads if k_eq_v else None,
        attention_k_eq_v=k_eq_v,
        vocab_size=hf.get("vocab_size", 262144),
        rope_theta_local=local.get("rope_theta", 10_000.0),
        rope_theta_global=full.get("rope_theta", 1_000_000.0),
        partial_rotary_factor=full.get("partial_rotary_factor", 0.25),
        max_seq_len=hf.get("max_position_embeddings", 131072),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        global_layers=global_layers,
        num_kv_shared_layers=hf.get("num_kv_shared_layers", 0),
        use_double_wide_mlp=hf.get("use_double_wide_mlp", False),
        hidden_size_per_layer_input=hf.get("hidden_size_per_layer_input", 256) or 0,
        vocab_size_per_layer_input=hf.get("vocab_size_per_layer_input", 262144),
        num_experts=(hf.get("num_experts") or 0) if hf.get("enable_moe_block") else 0,
        top_k_experts=(hf.get("top_k_experts") or 0) if hf.get("enable_moe_block") else 0,
        moe_intermediate_size=(hf.get("moe_intermediate_size") or 0) if hf.get("enable_moe_block") else 0,
        final_logit_softcapping=hf.get("final_logit_softcapping") or 30.0,
        tie_word_embeddings=False if untied_at_top else hf.get("tie_word_embeddings", True),
        vision_config=vision_config,
        vision_bidirectional=hf.get("use_bidirectional_attention") == "vision",
        audio_config=audio_config,
    )


def gemma4_to_hf(c: Gemma4Config) -> dict:
    """The config.json that transformers reads back to this config: `gemma4_text`, or with a vision tower the
    multimodal `gemma4` that holds it as its text_config."""
    if c.vision_config is None and c.audio_config is None:
        return gemma4_text_to_hf(c)
    v, a = c.vision_config, c.audio_config
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": {k: v for k, v in gemma4_text_to_hf(c).items() if k != "architectures"},
        "vision_config": None if v is None else gemma4_vision_to_hf(v),
        "audio_config": None if a is None else gemma4_audio_to_hf(a),
        **({} if v is None else {"image_token_id": v.image_token_id}),
        **({} if a is None else {"audio_token_id": a.audio_token_id}),
        "tie_word_embeddings": c.tie_word_embeddings,
    }


def gemma4_text_to_hf(c: Gemma4Config) -> dict:
    return {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "global_head_dim": c.global_head_dim,
        "num_global_key_value_heads": c.num_global_kv_heads if c.attention_k_eq_v else None,
        "attention_k_eq_v": c.attention_k_eq_v,
        "intermediate_size": c.intermediate_size,
        "sliding_window": c.sliding_window,
        "vocab_size": c.vocab_size,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_theta_local},
            "full_attention": {
                "rope_type": "proportional",
                "rope_theta": c.rope_theta_global,
                "partial_rotary_factor": c.partial_rotary_factor,
            },
        },  # fmt: skip
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.rms_norm_eps,
        "layer_types": ["full_attention" if g else "sliding_attention" for g in c.global_layers],
        "num_kv_shared_layers": c.num_kv_shared_layers,
        "use_double_wide_mlp": c.use_double_wide_mlp,
        "hidden_size_per_layer_input": c.hidden_size_per_layer_input,
        "vocab_size_per_layer_input": c.vocab_size_per_layer_input,
        "enable_moe_block": c.num_experts > 0,
        "num_experts": c.num_experts or None,
        "top_k_experts": c.top_k_experts or None,
        "moe_intermediate_size": c.moe_intermediate_size or None,
        "final_logit_softcapping": c.final_logit_softcapping,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": c.tie_word_embeddings,
        "use_bidirectional_attention": "vision" if c.vision_bidirectional else None,
        "bos_token_id": BOS_ID,
        "pad_token_id": PAD_ID,
    }


def gemma4_vision_from_hf(hf: dict) -> Gemma4VisionConfig:
    """From a multimodal `gemma4` config.json's vision_config; what it omits takes transformers' defaults."""
    v = hf.get("vision_config")
    if not isinstance(v, dict):
        raise ValueError(f"vision_config must be a JSON object, not {type(v).__name__}")
    rope = v.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"vision RoPE {rope} is not supported (only Gemma 4's axial)")
    d = Gemma4VisionConfig()
    fields = tower_from_hf(v, d, GEMMA4_VISION_FIELDS)
    rope_theta, image_token_id = rope.get("rope_theta", d.rope_theta), hf.get("image_token_id", d.image_token_id)
    return Gemma4VisionConfig(**fields, rope_theta=rope_theta, image_token_id=image_token_id)


def gemma4_vision_to_hf(v: Gemma4VisionConfig) -> dict:
    rope = {"rope_type": "axial", "rope_theta": v.rope_theta}
    return {"model_type": "gemma4_vision", **tower_to_hf(v, GEMMA4_VISION_FIELDS), "rope_parameters": rope,
            "hidden_activation": "gelu_pytorch_tanh"}  # fmt: skip


def gemma4_audio_from_hf(hf: dict) -> Gemma4AudioConfig:
    """From a multimodal `gemma4` config.json's audio_config; what it omits takes transformers' defaults."""
    a = hf.get("audio_config")
    if not isinstance(a, dict):
        raise ValueError(f"audio_config must be a JSON object, not {type(a).__name__}")
    if a.get("attention_context_right", 0) != 0 or a.get("hidden_act", "silu") != "silu":
        raise ValueError("audio config: only Gemma 4's causal attention (no right context) and SiLU are supported")
    d = Gemma4AudioConfig()
    fields = tower_from_hf(a, d, AUDIO_FIELDS)
    fields["subsampling_conv_channels"] = tuple(fields["subsampling_conv_channels"])
    return Gemma4AudioConfig(**fields, audio_token_id=hf.get("audio_token_id", d.audio_token_id))


def gemma4_audio_to_hf(a: Gemma4AudioConfig) -> dict:
    return {"model_type": "gemma4_audio", **tower_to_hf(a, AUDIO_FIELDS), "attention_context_right": 0,
            "subsampling_conv_channels": list(a.subsampling_conv_channels), "hidden_act": "silu"}  # fmt: skip
