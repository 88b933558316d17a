"""Loading a checkpoint into the model, in one place (gpt-fast's _load_model):

from_pretrained: the files (checkpoint.load_weights: any format, any layout) -> config and tensors
in our names -> the weights policy (int4 / int8 / dense) -> q/k/v and gate/up stacked (fuse_projections, at
the end with its inverse, split_projections, which exports use) -> from_tensors:
the model built on the meta device, its linears swapped for the quantized ones the tensors ask for
(quant.replace_linears), every tensor checked against it, assigned -> an int8 head's ranker -> the CPU
kernels' packing.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint, cpu_kernels, quant
from .config import AUDIO_MODULES, GEMMA4_MODEL_TYPES, VISION_MODULES, Gemma3Config, Gemma4Config
from .formats import config_json
from .gemma4 import Gemma4
from .model import Gemma3

Config = Gemma3Config | Gemma4Config
Model = Gemma3 | Gemma4


def from_pretrained(
    path_or_hub_id: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    weights: str = "auto",
    activations: str | None = None,
) -> Model:
    """Load a checkpoint directory, a .safetensors or .gguf file, or a hub repo id.

    weights="auto":  int4 stays int4, dense weights are quantized to int4 (group 32: QAT weights exactly on their
                     grid, others asymmetric, with zero points),
                     GGUF tensors stored at more than 4 bits become int8 (see formats/gguf.py), and
                     an int8 head ranks the vocabulary with an int4 copy first (Int8Linear.unembed);
    weights="int4":  every linear weight int4;  weights="dense": every weight a float tensor of `dtype`.
    The vision tower and projector (4B/12B/27B) keep their float weights, in `dtype` (float32 for a bf16 `dtype`
    on a CPU without native bf16 matmuls; Gemma 4's vision and audio towers too). Gemma 4 (its config.json's
    model_type gemma4_text or gemma4) loads as gemma4.Gemma4, its per-layer embeddings int8 under "auto", its
    router float. activations: the CPU int4 matmuls' ("int8" or "bf16"; default cpu_kernels.ACTIVATIONS).
    """
    path = checkpoint.resolve(path_or_hub_id)  # once: a hub id is looked up (downloaded) here
    if path.suffix == ".gguf" and weights == "auto":
        try:
            path = cached_gguf(path)
        except OSError as e:  # a cache that cannot be written: the file is converted as it is, each time
            warnings.warn(f"{e}: loading {path.name} without caching its conversion", stacklevel=2)
    config, tensors, above_4_bits = load_checkpoint(path)
    # stacked here, so that the unstacked copies are freed before the model is built and packed
    tensors = convert_weights(tensors, weights, above_4_bits, consume=True)
    tensors = fuse_projections(tensors, config.num_layers, stacked_groups(config), consume=True)
    model = from_tensors(config, tensors, dtype, device)
    if dtype == torch.bfloat16 and cpu_kernels.bf16_matmuls_are_slow(torch.device(device or "cpu")):
        # bf16 matmuls are several times slower than float32's on CPUs without native bf16 (AVX2): the towers,
        # which read a prompt's images and recordings hundreds of patches or frames at a time, compute in float32
        for name in ("vision", "projector", "embed_vision", "audio", "embed_audio"):
            if getattr(model, name, None) is not None:
                getattr(model, name).float()
    if weights == "auto" and isinstance(model.head, quant.Int8Linear):  # an int8 head: rank with int4 first
        head = model.head  # its ranker is cached by the default model's conversion
        head.add_ranker(checkpoint.read_ranker(path, head.out_features, head.in_features))
    lookups_only = [model.embed] if model.lm_head is not None else []  # embeddings never used as a matmul
    lookups_only += [model.embed_per_layer] if isinstance(model, Gemma4) and model.embed_per_layer else []
    return cpu_kernels.use_cpu_kernels(model, lookups_only=tuple(lookups_only), activations=activations)


def cached_gguf(path: Path) -> Path:
    """A GGUF file converted as weights="auto" loads it, into the cache on first use (checkpoint.gguf_cache: keyed
    by the file's size, mtime and header), so that later loads read our layout as the default model's do instead
    of dequantizing and quantizing every tensor again. A conversion removes those of files gone or changed."""
    directory, source = checkpoint.gguf_cache(path)

    def convert() -> tuple[Config, dict[str, torch.Tensor], bytes]:
        checkpoint.remove_stale_gguf_conversions()
        config, tensors, above_4_bits = load_checkpoint(path)
        tensors = convert_weights(tensors, "auto", above_4_bits, consume=True)
        return config, tensors, checkpoint.tokenizer_proto(path)

    return checkpoint.cached_conversion(directory, path.name, convert, {checkpoint.SOURCE: source})


def from_tensors(
    config: Config,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
) -> Model:
    """The model holding a state dict in our names as it is: dense weights, or int4/int8 pairs (the layers
    become Int4Linear / Int8Linear); float tensors cast to `dtype`."""
    tensors = fuse_projections(tensors, config.num_layers, stacked_groups(config))
    with torch.device("meta"):
        model = Gemma4(config) if isinstance(config, Gemma4Config) else Gemma3(config)
    quant.replace_linears(model, tensors)
    check_state_dict(model, tensors)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, assign=True)
    return model.to(device).eval().requires_grad_(False)  # for inference: no autograd graph, whoever calls it


def load_checkpoint(path_or_hub_id: str | Path) -> tuple[Config, dict[str, torch.Tensor], set[str]]:
    """Config, tensors as stored (our names) and the weights that "auto" keeps at 8 bits (a GGUF's stored above
    4 bits; Gemma 4's per-layer embeddings), of any checkpoint."""
    hf_config, tensors, above_4_bits = checkpoint.load_weights(path_or_hub_id)
    if hf_config is None:  # no config.json: recognise a published size by its shapes
        return Gemma3Config.from_shapes({k: tuple(t.shape) for k, t in tensors.items()}), tensors, above_4_bits
    gemma4 = hf_config.get("model_type") in GEMMA4_MODEL_TYPES
    try:
        config = config_json.from_hf(hf_config)
    except (ValueError, TypeError) as e:  # TypeError: a field of the wrong type
        where = "GGUF metadata" if str(path_or_hub_id).endswith(".gguf") else "config.json"
        raise ValueError(f"{path_or_hub_id}: {where}: {e}") from None
    if config.tie_word_embeddings:  # a stored lm_head is a copy of the embedding
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}
    if gemma4:
        tensors = gemma4_text_tensors(config, tensors, path_or_hub_id)
        above_4_bits = above_4_bits | {k for k in tensors if k.startswith("embed_per_layer.")}
    return config, tensors, above_4_bits


GEMMA4_TOWERS = (*VISION_MODULES, *AUDIO_MODULES)  # our names of its towers


def gemma4_text_tensors(config: Gemma4Config, tensors: dict, source: str | Path) -> dict[str, torch.Tensor]:
    """Gemma 4's language model and towers: the tensors of a tower its config does not describe are dropped, and
    so are the keys and values that Google's files still carry for the KV-shared layers (which read an earlier
    layer's); each with one warning."""
    kept = (VISION_MODULES if config.vision_config else ()) + (AUDIO_MODULES if config.audio_config else ())
    towers = [k for k in tensors if k.startswith(GEMMA4_TOWERS) and not k.startswith(kept)]
    if towers:
        warnings.warn(f"{source}: config.json describes no tower for {len(towers)} tensors ({towers[0]}, ...): "
                      "left out", stacklevel=3)  # fmt: skip
    shared = re.compile(r"layers\.(\d+)\.attn\.(k_proj|v_proj|k_norm|v_norm)\.")
    unused = [k for k in tensors if (m := shared.match(k)) and int(m[1]) >= config.first_shared_layer]
    if unused:
        warnings.warn(f"{source}: {len(unused)} key/value tensors of the KV-shared layers ({unused[0]}, ...) are "
                      "unused: dropped", stacklevel=3)  # fmt: skip
    return {k: v for k, v in tensors.items() if k not in set(towers) | set(unused)}


def convert_weights(
    tensors: dict[str, torch.Tensor],
    weights: str,
    above_4_bits: set[str],
    consume: bool = False,
    integer_zero_points: bool = False,
) -> dict[str, torch.Tensor]:
    """The weights policy (quant.convert_state_dict) applied to the language model; the vision tower and its
    projector keep float weights (the checkpoints keep them bf16, and their 4096-token passes are compute-bound
    anyway): a checkpoint that quantized them too (torchao's recipes quantize every linear) is dequantized. So is
    Gemma 4's MoE router (small, and it decides which experts run). consume: empties `tensors`, each dense
    weight freed once quantized (the caller keeps no other reference to them). integer_zero_points: as
    quant.convert_state_dict."""
    towers = (*VISION_MODULES, *AUDIO_MODULES)
    float_tensors = {k: v for k, v in tensors.items() if k.startswith(towers) or ".router." in k}
    text_tensors = {k: v for k, v in tensors.items() if k not in float_tensors}
    if consume:
        tensors.clear()
    text = quant.convert_state_dict(text_tensors, weights, above_4_bits, consume, integer_zero_points)
    return text | quant.convert_state_dict(float_tensors, "dense")


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
        if t.is_floating_point() and t.numel() and not all(bool(end.isfinite()) for end in torch.aminmax(t)):
            # (NaN and infinities reach the minimum or maximum: several times faster than isfinite(t).all())
            raise ValueError(f"tensor {name} holds NaN or infinite values")


# Checkpoints store q, k, v (and gate, up) as separate weights; the model holds each group stacked by rows, so
# that one matmul reads them all. Every format stacks row by row: int4/int8 data and their per-row scales alike.
FUSED = {
    "attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
# Gemma 4 stacks gate and up only: q, k and v stay apart, since its layers differ in which of them they have
# (k_eq_v layers no v, KV-shared ones only q).
GEMMA4_FUSED = {"mlp.gate_up_proj": FUSED["mlp.gate_up_proj"]}
KINDS = (*quant.FORMATS, "weight")  # int4_data, int8_data, weight: from the narrowest to the widest


def stacked_groups(config: Config) -> dict[str, tuple[str, ...]]:
    """The projections the model holds stacked."""
    return GEMMA4_FUSED if isinstance(config, Gemma4Config) else FUSED


def fuse_projections(
    tensors: dict[str, torch.Tensor],
    num_layers: int,
    groups: dict[str, tuple[str, ...]] = FUSED,
    consume: bool = False,
) -> dict[str, torch.Tensor]:
    """A state dict in the checkpoints' names -> the model's: each layer's q/k/v and gate/up weights stacked into
    qkv_proj and gate_up_proj (already stacked ones pass; `groups`: which, Gemma 4's only gate/up). A group
    mixing kinds is stacked in its widest: a GGUF's int8 v_proj beside int4 q and k makes all three int8 (per-row,
    finer than int4's steps). consume: stacks within `tensors` itself, so each layer's parts are freed as soon as
    they are stacked (the caller keeps no other reference to them) and the peak is one layer above the weights."""
    out = tensors if consume else dict(tensors)
    for i, fused in ((i, f) for i in range(num_layers) for f in groups):
        parts = [f"layers.{i}.{p}" for p in groups[fused]]
        kinds = [next((k for k in KINDS if f"{p}.{k}" in tensors), None) for p in parts]
        if all(k is None for k in kinds):
            continue  # already stacked, or not there at all (check_state_dict names what is missing)
        if None in kinds:
            missing = [f"{p}.weight" for p, k in zip(parts, kinds, strict=True) if k is None]
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing)}")
        kind = max(kinds, key=KINDS.index)
        stacked = [as_kind(out, p, k, kind) for p, k in zip(parts, kinds, strict=True)]
        if any("zeros" in pieces for pieces in stacked):  # int4 with zero points beside symmetric int4: zeros of 0
            for pieces in stacked:
                pieces.setdefault("zeros", torch.zeros_like(pieces["scales"]))
        for name in stacked[0]:
            out[f"layers.{i}.{fused}.{name}"] = torch.cat([pieces[name] for pieces in stacked])
    return out


def as_kind(tensors: dict[str, torch.Tensor], module: str, kind: str, target: str) -> dict[str, torch.Tensor]:
    """Pop module's weight (kind: "int4_data", "int8_data" or "weight") from tensors, converted to target's kind:
    {"weight": w} or {target: data, "scales": scales} (and "zeros": an int4 weight's zero points, if it has them)."""
    parts = [part for part in (kind, "scales", "zeros") if f"{module}.{part}" in tensors]
    if kind == target:
        return {part: tensors.pop(f"{module}.{part}") for part in parts}
    w = tensors[f"{module}.weight"] if kind == "weight" else quant.dequantize(tensors, module)  # float32
    for part in parts:
        del tensors[f"{module}.{part}"]
    if target == "weight":
        return {"weight": w}
    return dict(zip((target, "scales"), quant.FORMATS[target].quantize(w), strict=True))


def split_projections(tensors: dict[str, torch.Tensor], config: Gemma3Config) -> dict[str, torch.Tensor]:
    """The inverse of fuse_projections: stacked qkv_proj / gate_up_proj tensors back to the checkpoints' names
    (gate and up are halves; q, k and v config.qkv_sizes)."""
    out = {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        layer, _, fused = module.partition(".")[2].partition(".")
        if not (name.startswith("layers.") and fused in FUSED):
            out[name] = t
            continue
        pieces = t.split(config.qkv_sizes) if fused == "attn.qkv_proj" else t.chunk(2)
        for part, piece in zip(FUSED[fused], pieces, strict=True):
            out[f"layers.{layer}.{part}.{kind}"] = piece
    return out
