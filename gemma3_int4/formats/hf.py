"""Checkpoints in the Hugging Face layout: dense HF (google/gemma-3-*, google/gemma-4-*), gaunernst int4, the int4
layouts serving engines load, AWQ (awq.py) and compressed-tensors (compressed_tensors.py), and torchao's
(torchao.py). Safetensors directories, read and written.

Reading: the tensors of every shard (safetensors as they are; torchao's pickles only through torchao.py) ->
AWQ / compressed-tensors / torchao weights decoded into gaunernst's int4 -> our names, in one place (`our_name`):
an int4 weight "<module>.weight.int4_data" / "<module>.weight.scales" [/ "<module>.weight.zeros"] becomes
"<module>.int4_data" / "<module>.scales" [/ "<module>.zeros"] (see quant.py) -> Gemma 4's stacked experts split
into one linear each. Writing is the way back (`hf_name`), in shards with an index, with config.json
(config_json.py) and the tokenizer files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .. import files, quant
from ..config import Gemma3Config, Gemma4Config
from . import awq, compressed_tensors, config_json, torchao
from .packed_int4 import int4_pair, integer_zero_points

INDEX = "model.safetensors.index.json"
PICKLED_INDEX = "pytorch_model.bin.index.json"
PICKLED = "pytorch_model*.bin"  # torchao's pickled releases: read by torchao.py, never by a free unpickler
# Where each part lives in each layout: gaunernst's / older transformers' multimodal, newer transformers'
# multimodal (model.language_model.*), text-only (model.*).
TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.")
VISION_PREFIXES = {  # -> ours, first match wins; inside, the tower keeps the checkpoints' module names (vision.py)
    "vision_tower.vision_model.": "vision.",
    "model.vision_tower.vision_model.": "vision.",
    "vision_tower.": "vision.",  # transformers 5 drops the vision_model level
    "model.vision_tower.": "vision.",
    "multi_modal_projector.": "projector.",
    "model.multi_modal_projector.": "projector.",
    "model.audio_tower.": "audio.",  # Gemma 4's audio tower, its module names kept (gemma4_audio.py)
    "audio_tower.": "audio.",
}
VISION_RENAMES = {  # checkpoint -> ours, within the tower: vision.py has no embeddings/encoder containers
    "embeddings.patch_embedding.": "patch_embedding.",
    "embeddings.position_embedding.": "position_embedding.",
    "encoder.layers.": "layers.",
}
RENAMES = {  # HF module names -> ours
    "embed_tokens.": "embed.",
    ".self_attn.": ".attn.",
    ".input_layernorm.": ".input_norm.",
    ".post_attention_layernorm.": ".post_attn_norm.",
    ".pre_feedforward_layernorm.": ".pre_ffw_norm.",
    ".post_feedforward_layernorm.": ".post_ffw_norm.",
    "embed_tokens_per_layer.": "embed_per_layer.",  # Gemma 4's per-layer embeddings (E2B, E4B)
}
QUANTIZED_RENAMES = {  # a quantized weight's tensors, in every part of the model (torchao quantizes the tower too)
    ".weight.int4_data": ".int4_data",
    ".weight.int8_data": ".int8_data",  # ours: int8 with per-row scales, for GGUF tensors stored above 4 bits
    ".weight.scales": ".scales",
    ".weight.zeros": ".zeros",  # ours: the zero points of int4 from asymmetric sources
}


def read(path: Path) -> tuple[dict | None, dict[str, torch.Tensor], set[str]]:
    """The config.json (None if there is none; its quantization_config decoded away), the tensors (our names, as
    stored: int4 and int8 pairs, the rest float) and the dense weights that weights="auto" keeps at 8 bits (those
    an AWQ or compressed-tensors checkpoint names as not quantized)."""
    hf_config = read_config(path if path.is_dir() else path.parent)
    quantization = (hf_config or {}).get("quantization_config")
    tensors = {}
    for name, t in decode_int4_layouts(read_tensors(path, weight_files(path)), quantization).items():
        tensors[our_name(name)] = t
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        data = [k for k in quant.FORMATS if f"{module}.{k}" in tensors]
        if kind in ("scales", "zeros") and not data:
            raise ValueError(f"{path}: quantized tensor {name} has no matching int4_data")
        if kind == "zeros" and data != ["int4_data"]:
            raise ValueError(f"{path}: zero points {name} belong to int4 data, not {data[0]}")
        if kind in quant.FORMATS:
            if f"{module}.scales" not in tensors:
                raise ValueError(f"{path}: quantized tensor {name} has no matching scales")
            if t.dtype != torch.int8:
                raise ValueError(f"{path}: quantized tensor {name} has dtype {t.dtype}, expected torch.int8")
    if hf_config is not None:
        hf_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}  # decoded above
    return hf_config, split_experts(tensors), kept_above_4_bits(quantization, tensors)


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint: the safetensors index's shards, or every *.safetensors; without any,
    the pickled ones (torchao's pytorch_model.bin, or its index's shards)."""
    if path.is_file():
        return [path]
    if (path / INDEX).exists():
        return indexed_shards(path, INDEX)
    if shards := sorted(path.glob("*.safetensors")):
        return shards
    if (path / PICKLED_INDEX).exists():
        return indexed_shards(path, PICKLED_INDEX)
    if shards := sorted(path.glob(PICKLED)):
        return shards
    raise FileNotFoundError(f"{path}: no *.safetensors (or {PICKLED}) weights found")


def indexed_shards(path: Path, index: str) -> list[Path]:
    """The shards a safetensors or pytorch_model.bin index lists, each a file inside `path`."""
    try:
        weight_map = json.loads((path / index).read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path / index}: not a valid weights index ({e!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path / index}: weight_map must map tensor names to shard file names")
    for name in weight_map.values():  # by name, not resolved: a hub cache's shards link to its blobs
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{path / index}: shard {name!r} is not a file inside {path}")
    shards = [path / f for f in sorted(set(weight_map.values()))]
    for f in shards:
        if not f.exists():
            raise FileNotFoundError(f"{path / index} lists shard {f.name}, which is missing from {path}")
    return shards


def read_config(directory: Path) -> dict | None:
    """config.json as a dict, or None if there is none (a dangling or looping link is an error, not none)."""
    path = directory / "config.json"
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a config must be a JSON object, not {type(config).__name__}")
    return config


def read_tensors(path: Path, shards: list[Path]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors in its own names; torchao's weights (pickled or in safetensors with their
    metadata) already decoded into int4 / int8 pairs (torchao.decode)."""
    if all(f.suffix == ".bin" for f in shards):
        state = {}
        for f in tqdm(shards, desc="loading weights", unit="shard", disable=None, leave=False):
            state |= torchao.read_pickle(f)
        return torchao.decode(state, path)
    tensors, metadata = read_safetensors_with_metadata(shards)
    if not torchao.is_torchao_metadata(metadata):
        return tensors
    return torchao.decode(torchao.from_safetensors(tensors, metadata, path), path)


def read_safetensors(shards: list[Path]) -> dict[str, torch.Tensor]:
    return read_safetensors_with_metadata(shards)[0]


READ_CHUNK = 256 << 20  # bytes copied out of a shard's memory map before it is closed and opened again


def read_safetensors_with_metadata(shards: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of every shard, and their headers' metadata (torchao's writes the whole of it into each).
    safe_open's tensors are views of the shard's memory map, and every page of it they touch counts as this
    process's memory for as long as any of them lives. The model replaces some (q, k, v and gate, up are fused
    into copies), whose pages would stay counted beside the copies: 1.5x the weights at 12B. So every tensor is
    copied out, a chunk at a time, each chunk's map closed after it; but the embedding tables stay views of a
    map of their own, since a lookup touches only the rows of the tokens it reads (Gemma 4's per-layer tables
    are GBs)."""
    tensors, metadata = {}, {}
    for f in tqdm(shards, desc="loading weights", unit="shard", disable=None, leave=False):
        try:
            with safe_open(f, framework="pt") as st:
                names = [name for name in st.keys() if "embed" not in name]
                metadata |= st.metadata() or {}
            while names:
                with safe_open(f, framework="pt") as st:
                    copied = 0
                    while names and copied < READ_CHUNK:
                        name = names.pop()
                        tensors[name] = st.get_tensor(name).clone()
                        copied += tensors[name].nbytes
            with safe_open(f, framework="pt") as st:
                tensors |= {name: st.get_tensor(name) for name in st.keys() if "embed" in name}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    return tensors, metadata


INT4_LAYOUTS = {"awq": awq, "compressed-tensors": compressed_tensors}  # quant_method -> its module


def decode_int4_layouts(tensors: dict[str, torch.Tensor], quantization: dict | None) -> dict[str, torch.Tensor]:
    """AWQ ("<m>.qweight/qzeros/scales") and compressed-tensors ("<m>.weight_packed/weight_scale/weight_shape
    [/weight_zero_point][/weight_g_idx]") weights -> "<m>.weight.int4_data/.scales" (or "<m>.weight"); other
    tensors pass."""
    method = (quantization or {}).get("quant_method")
    if method not in INT4_LAYOUTS:
        if method not in (None, "torchao"):  # torchao's weights describe themselves (read_tensors decoded them)
            raise ValueError(f"quantization_config: quant_method {method!r}: we read awq, compressed-tensors, torchao")
        return tensors
    layout = INT4_LAYOUTS[method]
    group_size, bits = layout.settings(quantization)
    if bits != 4 or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{method}: we read 4-bit weights in groups, not bits={bits}, group_size={group_size}")
    out = {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind != layout.SUFFIXES[0]:
            if kind not in layout.SUFFIXES:
                out[name] = t
            continue
        if missing := [f"{module}.{r}" for r in layout.REQUIRED if f"{module}.{r}" not in tensors]:
            raise ValueError(f"{method} weight {name} comes without {', '.join(missing)}")
        for kind, value in int4_pair(*layout.unpack(tensors, module, group_size)).items():
            out[f"{module}.weight" if kind == "weight" else f"{module}.weight.{kind}"] = value
    return out


def our_name(name: str) -> str:
    """A checkpoint tensor name -> ours. The output head (lm_head.*, or language_model.lm_head.* in older
    multimodal layouts) keeps its name: a tied checkpoint's copy of the embedding is dropped by the loader."""
    for old, new in QUANTIZED_RENAMES.items():  # "<m>.weight.int4_data" -> "<m>.int4_data", in any part
        if name.endswith(old):
            name = name.removesuffix(old) + new
    if name.startswith(("lm_head.", "language_model.lm_head.")):
        return "lm_head." + name.split("lm_head.", 1)[1]
    for prefix, ours in VISION_PREFIXES.items():
        if name.startswith(prefix):
            name = name[len(prefix) :]
            for old, new in VISION_RENAMES.items():
                if name.startswith(old):
                    name = new + name[len(old) :]
            return ours + name
    for prefix in TEXT_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    for old, new in RENAMES.items():
        name = name.replace(old, new)
    return name


def kept_above_4_bits(quantization: dict | None, tensors: dict[str, torch.Tensor]) -> set[str]:
    """The dense weights (our names) that an AWQ or compressed-tensors checkpoint names as not quantized
    (modules_to_not_convert, ignore; our exports list the weights their source held above 4 bits): weights="auto"
    keeps them at 8 bits."""
    quantization = quantization or {}
    modules = quantization.get("modules_to_not_convert") or quantization.get("ignore") or []
    return {name for m in modules if (name := our_name(f"{m}.weight")) in tensors}


EXPERTS = re.compile(r"layers\.\d+\.experts\.(gate_up_proj|down_proj)")  # Gemma 4's experts, stacked in HF's layout


def split_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gemma 4 MoE: HF's stacked expert weights "layers.N.experts.gate_up_proj" (E, 2I, D) and ".down_proj"
    (E, D, I) -> one linear per expert, "layers.N.experts.<e>.gate_up_proj.weight" (gemma4.Experts)."""
    out = {}
    for name, t in tensors.items():
        if not EXPERTS.fullmatch(name):
            out[name] = t
            continue
        if t.dim() != 3:
            raise ValueError(f"expert weights {name} have shape {tuple(t.shape)}, expected (experts, out, in)")
        layer, _, part = name.rpartition(".")
        out.update({f"{layer}.{e}.{part}.weight": w for e, w in enumerate(t.unbind())})
    return out


def write(
    config: Gemma3Config | Gemma4Config,
    tensors: dict[str, torch.Tensor],
    tokenizer: bytes,
    dst: Path,
    layout: str = "int4",
    companions: list[Path] = (),
    extras: dict[str, dict[str, torch.Tensor]] | None = None,
    text_files: dict[str, str] | None = None,
    column_weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a safetensors directory (our names and tensors in) in one of the layouts, atomically
    (files.atomic_output: an existing `dst` is an error, and an interrupted write leaves nothing); read reads it
    back.
    "int4": gaunernst's (int4 and int8 pairs as they are, the rest bf16);
    "awq", "compressed-tensors": every int4 linear in that layout, the embedding dense bf16 (neither has an
    int4 embedding), with the quantization_config vLLM reads;   "dense": every weight bf16, as Google's.
    `text_files` (name -> text: hf_tokenizer.tokenizer_files) are written beside tokenizer.model, and then
    `companions` (checkpoint.companion_files) copied as they are, the source's own files taking precedence;
    `extras` maps file names to more tensors, each written as a safetensors file of its own (the default
    model's RANKER). `column_weights` (module -> (K,), our names: ptq.input_mean_squares) weigh the refit of the
    weights that "awq" and "compressed-tensors" cannot hold as they are (packed_int4.float_zero_points)."""
    hf_config = config_json.to_hf(config)
    with files.atomic_output(dst) as tmp:
        gemma4 = hf_config.get("model_type") == "gemma4"
        multimodal = gemma4 or hf_config.get("model_type") == "gemma3"
        if layout == "dense":  # Gemma 4's experts in HF's stacked layout
            tensors = stack_experts(tensors)
        tensors = {hf_name(k, multimodal, gemma4): v for k, v in tensors.items()}
        if layout != "int4":
            weights = {hf_name(f"{m}.weight", multimodal, gemma4): w for m, w in (column_weights or {}).items()}
            tensors, quantization = encode_int4_layout(tensors, layout, multimodal, weights)
            hf_config = {**hf_config, "torch_dtype": "bfloat16"}
            if quantization is not None:
                hf_config["quantization_config"] = quantization
        write_shards(tensors, tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        (tmp / "tokenizer.model").write_bytes(tokenizer)
        for name, text in (text_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for file in companions:
            shutil.copyfile(file, tmp / file.name)
        for name, extra in (extras or {}).items():
            save_safetensors(extra, tmp / name)


def hf_name(name: str, multimodal: bool = False, gemma4: bool = False) -> str:
    """Ours -> the checkpoint name in gaunernst's layout (text-only: model.*; multimodal: language_model.model.*,
    vision_tower.vision_model.*, multi_modal_projector.*); Gemma 4's multimodal in transformers' (gemma4:
    model.language_model.*, model.vision_tower.*, model.audio_tower.*, model.embed_vision.*, model.embed_audio.*)."""
    for old, new in QUANTIZED_RENAMES.items():
        if name.endswith(new):
            name = name.removesuffix(new) + old
    if name.startswith("projector."):
        return "multi_modal_projector." + name.removeprefix("projector.")
    if name.startswith("audio."):
        return "model.audio_tower." + name.removeprefix("audio.")
    if name.startswith("vision."):
        name = name.removeprefix("vision.")
        for old, new in VISION_RENAMES.items():
            if name.startswith(new):
                name = old + name[len(new) :]
        return ("model.vision_tower." if gemma4 else "vision_tower.vision_model.") + name
    if name.startswith(("embed_vision.", "embed_audio.")):
        return "model." + name
    for old, new in RENAMES.items():
        name = name.replace(new, old)
    if name.startswith("lm_head."):  # an untied head
        return ("language_model." if multimodal and not gemma4 else "") + name
    if gemma4:
        return "model.language_model." + name
    return ("language_model.model." if multimodal else "model.") + name


def stack_experts(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The inverse of split_experts, in `dtype` (HF's layout has no per-expert int4): for a dense export."""
    out, stacked = {}, {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        match = re.fullmatch(r"(layers\.\d+\.experts)\.(\d+)\.(gate_up_proj|down_proj)", module)
        if match is None:
            out[name] = t
        elif kind in ("weight", *quant.FORMATS):  # its scales and zeros come with it
            w = t if kind == "weight" else quant.dequantize(tensors, module)
            stacked.setdefault(f"{match[1]}.{match[3]}", {})[int(match[2])] = w.to(dtype)
    for name, experts in stacked.items():
        out[name] = torch.stack([experts[e] for e in range(len(experts))])
    return out


def encode_int4_layout(
    tensors: dict[str, torch.Tensor],
    layout: str,
    multimodal: bool,
    column_weights: dict[str, torch.Tensor] | None = None,
) -> tuple[dict, dict | None]:
    """Checkpoint tensors in gaunernst's layout -> `layout` ("awq", "compressed-tensors" or "dense") and the
    quantization_config that describes it (None for dense). The embedding and, for "dense", every int4 weight
    are dequantized to bf16; so are int8 weights (a GGUF's above 4 bits: 4 bits would lose much of what the
    source kept), which the config lists as not quantized. Int4 weights with float zeros are refitted with
    integer ones, each by its column_weights (its "<module>.weight" name: quant.quantize_int4_asymmetric's) if
    given."""
    out, int4, refitted = {}, {}, {}  # int4: "<m>.weight" -> (int4_data, scales, integer zero points)
    unquantized = []  # the int8 linears, written bf16
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind not in quant.FORMATS:  # norms, the vision tower, a dense embedding (scales are read with their data)
            if kind not in ("scales", "zeros"):
                out[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
            continue
        base = module.removesuffix(".weight")
        if layout == "dense" or kind == "int8_data" or "embed_tokens" in module or "lm_head" in module:
            out[module] = quant.dequantize(tensors, module).to(torch.bfloat16)  # the engines read heads dense
            if layout != "dense" and kind == "int8_data":
                unquantized.append(base)
            continue
        scales = tensors[f"{module}.scales"]
        zp = integer_zero_points(scales, tensors.get(f"{module}.zeros"))
        if zp is None:  # zeros that no integer zero point gives (a GGUF's Q4_K minimums)
            w = quant.dequantize(tensors, module)
            t, scales, zeros = quant.quantize_int4_asymmetric(w, True, (column_weights or {}).get(module))
            zp = integer_zero_points(scales, zeros)
            error = quant.dequantize_int4(t, scales.float(), zeros) - w
            refitted[module] = (error.square().sum().item(), w.square().sum().item())  # squared error, norm
        int4[base] = (t, scales, zp)
    if refitted:
        error, norm = (sum(x) for x in zip(*refitted.values(), strict=True))
        warnings.warn(
            f"{len(refitted)} weight(s) ({next(iter(refitted))}, ...) have zero points that {layout} "
            "cannot hold (not whole multiples of their scales): refitted with integer zero points, "
            f"{(error / norm) ** 0.5:.2%} relative RMS error against their weights",
            stacklevel=2,
        )
    if layout not in INT4_LAYOUTS:
        return out, None
    towers = ("vision_tower", "multi_modal_projector", "audio_tower", "embed_vision", "embed_audio")  # kept float
    skip = [m for m in towers if any(k.startswith((m, f"model.{m}")) for k in out)] if multimodal else []
    packed, config = INT4_LAYOUTS[layout].encode(int4, skip, unquantized)
    return out | packed, config


def write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write tensors (checkpoint names) as gaunernst's converter does: model-00001.safetensors, ... and
    always a model.safetensors.index.json, even for a single shard."""
    directory.mkdir(parents=True, exist_ok=True)
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(tqdm(shards, desc="writing", unit="shard", disable=None, leave=False), 1):
        file = f"model-{i:05d}.safetensors"
        save_safetensors(shard, directory / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2))


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as e:  # its I/O errors (a full disk) are not OSErrors
        raise OSError(str(e)) from None
    os.chmod(path, 0o666 & ~umask())  # safetensors writes through a private (0600) temporary: readable as any file


def umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: set it straight back
    os.umask(mask)
    return mask
