"""Google's own Flax/Orbax checkpoints of Gemma 3 (the QAT int4 ones included), read into our names.

An Orbax checkpoint (orbax.checkpoint.StandardCheckpointer) is a flat dict: slash-joined module path ->
{param: array}, e.g. "transformer/layer_0/attn/q_einsum" -> {"w": (num_heads, D, head_dim)}. Google's layout
differs from transformers' in three ways, all undone in `layout`:
- attention keeps heads as an axis of their own (einsum weights), K and V share one array, gate and up another;
- SigLIP's weights are Flax's: dense kernels (in, out), the patch convolution HWIO, the positions (1, N, C);
- there is no config: it comes from the shapes (`config_from_shapes`).
Norm scales are stored as transformers stores them (the model computes x * (1 + scale)). The QAT checkpoints
store their weights dense, on the int4 grid: the caller's quant.quantize_int4 recovers q and the scales exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import Gemma3Config, VisionConfig
from . import config_json

SIGLIP = "SigLiPFromPatches_0/siglip_encoder"
MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")  # what orbax writes beside the arrays
MULTIMODAL_EXTRA_ROWS = 64  # transformers' multimodal vocabulary: 262144 tokens + 64 unused rows (262208)
POOL = 4  # Gemma 3's projector averages 4x4 patches (64x64 -> 256 soft tokens per image)


def is_orbax(path: Path) -> bool:
    """A directory that orbax wrote: it holds a checkpoint-metadata, tree-metadata or OCDBT manifest file."""
    path = Path(path)
    return path.is_dir() and any((path / marker).is_file() for marker in MARKERS)


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor], set[str]]:
    """The config (transformers' config.json, inferred from the shapes), the tensors (our names, dense float32,
    the vision tower included) and the names of weights to keep above 4 bits (none: see checkpoint.load_weights)."""
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError("reading Flax/Orbax checkpoints needs orbax-checkpoint: pip install .[flax]") from None
    path = Path(path).expanduser().absolute()  # orbax takes absolute paths only
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata if is_orbax(path) else None
    if metadata is None or not isinstance(metadata.tree, dict):
        raise ValueError(f"{path}: not a readable Orbax checkpoint (a directory that StandardCheckpointer wrote)")
    stored = flatten(metadata.tree)
    shapes = {key: tuple(m.shape) for key, m in stored.items()}
    config = config_from_shapes(shapes, path)
    expected = layout(config)
    for key, shape, _ in expected.values():
        if key not in shapes:
            raise ValueError(f"{path}: Gemma 3 Orbax checkpoint has no {key}")
        if shapes[key] != shape:
            raise ValueError(f"{path}: {key} has shape {shapes[key]}, expected {shape} (for {describe(config)})")
    # A target of numpy arrays restores onto the CPU whatever devices the checkpoint was saved from (without
    # one, orbax rebuilds the saved sharding and fails on another topology); np.empty never touches its pages.
    target = unflatten({key: np.empty(m.shape, m.dtype) for key, m in stored.items()})
    arrays = flatten(checkpointer.restore(path, target))
    tensors = {}
    for name, (key, _, to_ours) in tqdm(expected.items(), desc="converting", unit="tensor", disable=None, leave=False):
        w = to_ours(np.asarray(arrays[key], dtype=np.float32))  # bf16 (ml_dtypes) too
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    return config_json.to_hf(config), tensors, set()


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a/b": {"w": x}} -> {"a/b/w": x}: one slash-joined key per array."""
    flat = {}
    for k, v in tree.items():
        flat |= flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return flat


def unflatten(flat: dict) -> dict:
    """The inverse of flatten for a StandardCheckpointer tree: module path -> {param: array}."""
    tree = {}
    for key, v in flat.items():
        module, _, param = key.rpartition("/")
        tree.setdefault(module, {})[param] = v
    return tree


def config_from_shapes(shapes: dict[str, tuple[int, ...]], path: Path | str = "checkpoint") -> Gemma3Config:
    """The config of a Gemma 3 tree (slash-joined keys -> shapes), which Orbax checkpoints do not hold: the sizes
    its shapes give, in our names, to Gemma3Config.from_shapes (any size: tiny test models too), with the vision
    tower's config read here (its heads are an axis of their own in Google's layout)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            found = ", ".join(sorted(shapes)[:5])
            raise ValueError(f"{path}: an Orbax checkpoint, but not of Gemma 3: it has no {key} (it has {found}, ...)")
        return shapes[key]

    vocab, hidden = shape("transformer/embedder/input_embedding")
    num_heads, _, head_dim = shape("transformer/layer_0/attn/q_einsum/w")
    num_layers = count(shapes, "transformer/layer_{}/attn/_key_norm/scale")
    vision = None
    if f"{SIGLIP}/pos_embedding" in shapes:
        _, patches, width = shape(f"{SIGLIP}/pos_embedding")
        patch_size, side = shape(f"{SIGLIP}/embedding/kernel")[0], math.isqrt(patches)
        block = f"{SIGLIP}/Transformer/encoderblock_0"
        vision = VisionConfig(
            image_size=side * patch_size,
            patch_size=patch_size,
            hidden_size=width,
            num_layers=count(shapes, SIGLIP + "/Transformer/encoderblock_{}/LayerNorm_0/scale"),
            num_heads=shape(f"{block}/MultiHeadDotProductAttention_0/query/kernel")[1],
            intermediate_size=shape(f"{block}/MlpBlock_0/Dense_0/kernel")[1],
            tokens_per_image=(side // POOL) ** 2,
        )
        vocab += MULTIMODAL_EXTRA_ROWS
    ours = {  # the shapes the config is read from, in our names
        "embed.weight": (vocab, hidden),
        "norm.weight": (hidden,),
        f"layers.{num_layers - 1}.input_norm.weight": (hidden,),
        "layers.0.attn.q_norm.weight": (head_dim,),
        "layers.0.attn.q_proj.weight": (num_heads * head_dim, hidden),
        "layers.0.attn.k_proj.weight": (shape("transformer/layer_0/attn/kv_einsum/w")[1] * head_dim, hidden),
        "layers.0.mlp.gate_proj.weight": (shape("transformer/layer_0/mlp/linear/w")[0], hidden),
    }
    return Gemma3Config.from_shapes(ours, vision, any_size=True)


def count(shapes: dict, pattern: str) -> int:
    """How many of pattern.format(0), pattern.format(1), ... the tree has, in a row."""
    n = 0
    while pattern.format(n) in shapes:
        n += 1
    return n


def describe(c: Gemma3Config) -> str:
    vision = f", SigLIP {c.vision_config.num_layers}x{c.vision_config.hidden_size}" if c.vision_config else ""
    return f"{c.num_layers} layers of {c.hidden_size}, {c.num_heads}/{c.num_kv_heads} heads of {c.head_dim}{vision}"


def as_is(w: np.ndarray) -> np.ndarray:
    return w


def heads_to_rows(w: np.ndarray) -> np.ndarray:
    """(heads, D, head_dim) -> nn.Linear's (heads * head_dim, D), head after head."""
    return w.transpose(0, 2, 1).reshape(-1, w.shape[1])


def layout(c: Gemma3Config) -> dict[str, tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]]:
    """Our name -> (Google's key, its shape, how its array becomes ours)."""
    D, H, K, hd, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    pad = MULTIMODAL_EXTRA_ROWS if c.vision_config else 0
    tensors = {
        "embed.weight": (
            "transformer/embedder/input_embedding",
            (c.vocab_size - pad, D),
            lambda w: np.pad(w, ((0, pad), (0, 0))),  # zero rows, as gaunernst's converter writes them
        ),
        "norm.weight": ("transformer/final_norm/scale", (D,), as_is),
    }
    for i in range(c.num_layers):
        g, o = f"transformer/layer_{i}/", f"layers.{i}."
        tensors |= {
            f"{o}input_norm.weight": (f"{g}pre_attention_norm/scale", (D,), as_is),
            f"{o}post_attn_norm.weight": (f"{g}post_attention_norm/scale", (D,), as_is),
            f"{o}pre_ffw_norm.weight": (f"{g}pre_ffw_norm/scale", (D,), as_is),
            f"{o}post_ffw_norm.weight": (f"{g}post_ffw_norm/scale", (D,), as_is),
            f"{o}attn.q_norm.weight": (f"{g}attn/_query_norm/scale", (hd,), as_is),
            f"{o}attn.k_norm.weight": (f"{g}attn/_key_norm/scale", (hd,), as_is),
            f"{o}attn.q_proj.weight": (f"{g}attn/q_einsum/w", (H, D, hd), heads_to_rows),
            f"{o}attn.k_proj.weight": (f"{g}attn/kv_einsum/w", (2, K, D, hd), lambda w: heads_to_rows(w[0])),
            f"{o}attn.v_proj.weight": (f"{g}attn/kv_einsum/w", (2, K, D, hd), lambda w: heads_to_rows(w[1])),
            f"{o}attn.o_proj.weight": (f"{g}attn/attn_vec_einsum/w", (H, hd, D), lambda w: w.reshape(-1, D).T),
            f"{o}mlp.gate_proj.weight": (f"{g}mlp/gating_einsum/w", (2, F, D), lambda w: w[0]),
            f"{o}mlp.up_proj.weight": (f"{g}mlp/gating_einsum/w", (2, F, D), lambda w: w[1]),
            f"{o}mlp.down_proj.weight": (f"{g}mlp/linear/w", (F, D), lambda w: w.T),
        }
    if c.vision_config:
        tensors |= vision_layout(c.vision_config, D)
    return tensors


def vision_layout(v: VisionConfig, text_hidden: int) -> dict[str, tuple[str, tuple[int, ...], Callable]]:
    """The SigLIP tower and the projector (which Google keeps in the text embedder)."""
    C, heads, P, Fv = v.hidden_size, v.num_heads, v.patch_size, v.intermediate_size
    hd = C // heads
    tensors = {
        "vision.patch_embedding.weight": (
            f"{SIGLIP}/embedding/kernel",
            (P, P, 3, C),
            lambda w: w.transpose(3, 2, 0, 1),
        ),
        "vision.patch_embedding.bias": (f"{SIGLIP}/embedding/bias", (C,), as_is),
        "vision.position_embedding.weight": (f"{SIGLIP}/pos_embedding", (1, v.patches_per_side**2, C), lambda w: w[0]),
        "vision.post_layernorm.weight": (f"{SIGLIP}/Transformer/encoder_norm/scale", (C,), as_is),
        "vision.post_layernorm.bias": (f"{SIGLIP}/Transformer/encoder_norm/bias", (C,), as_is),
        "projector.mm_soft_emb_norm.weight": ("transformer/embedder/mm_soft_embedding_norm/scale", (C,), as_is),
        "projector.mm_input_projection_weight": (
            "transformer/embedder/mm_input_projection/w",
            (C, text_hidden),
            as_is,
        ),
    }
    for j in range(v.num_layers):
        g, o = f"{SIGLIP}/Transformer/encoderblock_{j}/", f"vision.layers.{j}."
        attn = f"{g}MultiHeadDotProductAttention_0/"
        for ours, theirs in ("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1"):
            tensors[f"{o}{ours}.weight"] = (f"{g}{theirs}/scale", (C,), as_is)
            tensors[f"{o}{ours}.bias"] = (f"{g}{theirs}/bias", (C,), as_is)
        for ours, theirs in ("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"):
            # (C, heads, head_dim) -> (heads * head_dim, C)
            tensors[f"{o}self_attn.{ours}.weight"] = (
                f"{attn}{theirs}/kernel",
                (C, heads, hd),
                lambda w: w.reshape(C, -1).T,
            )
            tensors[f"{o}self_attn.{ours}.bias"] = (f"{attn}{theirs}/bias", (heads, hd), lambda w: w.reshape(-1))
        tensors[f"{o}self_attn.out_proj.weight"] = (f"{attn}out/kernel", (heads, hd, C), lambda w: w.reshape(-1, C).T)
        tensors[f"{o}self_attn.out_proj.bias"] = (f"{attn}out/bias", (C,), as_is)
        for ours, theirs, (n_in, n_out) in ("fc1", "Dense_0", (C, Fv)), ("fc2", "Dense_1", (Fv, C)):
            tensors[f"{o}mlp.{ours}.weight"] = (f"{g}MlpBlock_0/{theirs}/kernel", (n_in, n_out), lambda w: w.T)
            tensors[f"{o}mlp.{ours}.bias"] = (f"{g}MlpBlock_0/{theirs}/bias", (n_out,), as_is)
    return tensors
