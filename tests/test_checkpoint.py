"""Loading checkpoints in every layout people have: gaunernst int4 (sharded or not), dense HF, hub ids."""

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, hf_text_model, int4_checkpoint
from safetensors.torch import load_file, save_file

from gemma3_int4 import checkpoint, loader, quant
from gemma3_int4 import config as config_module
from gemma3_int4.formats.config_json import from_hf
from gemma3_int4.formats.hf import PICKLED

ROOT = Path(__file__).resolve().parents[1]


def max_diff(ours, hf, ids) -> float:
    with torch.no_grad():
        return (ours(ids) - hf(ids).logits).abs().max().item()


IDS = torch.randint(0, TINY["vocab_size"], (1, 30), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 40_000])
def test_gaunernst_int4_matches_transformers(tmp_path, max_shard_bytes):
    hf = hf_text_model()
    int4_checkpoint(hf, tmp_path, max_shard_bytes)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files[0] == "model-00001.safetensors" and (len(files) > 1) == (max_shard_bytes < 2**20)
    ours = loader.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(ours.layers[0].attn.qkv_proj, quant.Int4Linear)
    assert isinstance(ours.embed, quant.Int4Linear)
    assert max_diff(ours, hf, IDS) <= 1e-3
    dense = loader.from_pretrained(tmp_path, dtype=torch.float32, weights="dense")
    assert max_diff(dense, hf, IDS) <= 1e-3


def test_dense_hf_checkpoint_sharded_and_quantized_on_load(tmp_path):
    hf = hf_text_model()
    with torch.no_grad():  # a bf16 checkpoint, like Google's
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
    hf.save_pretrained(tmp_path, max_shard_size="100KB")  # model-00001-of-0000N.safetensors + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert max_diff(loader.from_pretrained(tmp_path, dtype=torch.float32, weights="dense"), hf, IDS) <= 1e-3
    ours = loader.from_pretrained(tmp_path, dtype=torch.float32)  # asymmetric int4 on load (no QAT grid)
    with torch.no_grad():  # hf now holds the same int4 weights
        for w in hf.parameters():
            if w.dim() == 2:
                data, scales, zeros = quant.quantize_int4_asymmetric(w)
                w.copy_(quant.dequantize_int4(data, scales.float(), zeros))
    assert isinstance(ours.layers[0].mlp.gate_up_proj, quant.Int4Linear) and ours.embed.zeros is not None
    assert max_diff(ours, hf, IDS) <= 1e-3


def test_single_safetensors_file_without_config(tmp_path, monkeypatch):
    """No config.json: a published size is recognised from the shapes (a tiny 'size' stands in here)."""
    hf = hf_text_model()
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    cfg = from_hf({**hf.config.to_dict(), "model_type": "gemma3_text"})
    sizes = {k: getattr(cfg, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                          "intermediate_size", "sliding_window", "query_pre_attn_scalar",
                                          "rope_scale_global", "max_seq_len")}  # fmt: skip
    monkeypatch.setitem(config_module.CONFIGS, "tiny", sizes)
    ours = loader.from_pretrained(tmp_path / "model.safetensors", dtype=torch.float32, weights="dense")
    assert ours.config.vocab_size == TINY["vocab_size"]
    assert max_diff(ours, hf, IDS) <= 1e-3
    monkeypatch.delitem(config_module.CONFIGS, "tiny")
    with pytest.raises(ValueError, match="match no published Gemma 3 size"):
        loader.from_pretrained(tmp_path, dtype=torch.float32)


@pytest.fixture
def int4_dir(tmp_path):
    int4_checkpoint(hf_text_model(), tmp_path, max_shard_bytes=40_000)
    return tmp_path


def edit_shards(directory, edit):
    for shard in directory.glob("model-*.safetensors"):
        save_file(edit(load_file(shard)), shard)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        loader.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        loader.from_pretrained(tmp_path)


def test_corrupt_safetensors_names_the_file(int4_dir):
    shard = int4_dir / "model-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="model-00002.safetensors: not a readable safetensors file"):
        loader.from_pretrained(int4_dir)


def test_missing_shard(int4_dir):
    (int4_dir / "model-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard model-00002.safetensors, which is missing"):
        loader.from_pretrained(int4_dir)


def test_missing_tensor_is_named(int4_dir):
    edit_shards(int4_dir, lambda t: {k: v for k, v in t.items() if not k.startswith("model.layers.3.mlp.up_proj")})
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): layers.3.mlp.up_proj.weight"):
        loader.from_pretrained(int4_dir)


def test_unexpected_tensor_is_named(int4_dir):
    edit_shards(int4_dir, lambda t: {**t, "model.layers.0.mlp.extra.weight": torch.zeros(4)})
    with pytest.raises(ValueError, match="unexpected tensor.*layers.0.mlp.extra.weight"):
        loader.from_pretrained(int4_dir)


def test_wrong_shape_is_named(int4_dir):
    def edit(t):
        if "model.norm.weight" in t:
            t["model.norm.weight"] = torch.zeros(65, dtype=torch.bfloat16)
        return t

    edit_shards(int4_dir, edit)
    with pytest.raises(ValueError, match=r"norm.weight has shape \(65,\), expected \(64,\)"):
        loader.from_pretrained(int4_dir)


def test_int4_data_without_scales(int4_dir):
    name = "model.layers.1.self_attn.q_proj.weight.scales"
    edit_shards(int4_dir, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match="quantized tensor layers.1.attn.q_proj.int4_data has no matching scales"):
        loader.from_pretrained(int4_dir)


def test_bad_config_json(int4_dir):
    (int4_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        loader.from_pretrained(int4_dir)
    (int4_dir / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="'mistral' is not Gemma 3"):
        loader.from_pretrained(int4_dir)


def test_hub_id_loads_from_the_hub_cache_layout(int4_dir, tmp_path_factory):
    """owner/name goes through huggingface_hub.snapshot_download; offline, it resolves the HF cache layout."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--someone--gemma-3-tiny-it-int4"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in int4_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    code = (
        "import torch; from gemma3_int4 import loader; "
        "m = loader.from_pretrained('someone/gemma-3-tiny-it-int4', dtype=torch.float32); "
        "print(type(m.embed).__name__, m.config.num_layers)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Int4Linear", "7"]
    code = "from gemma3_int4 import loader; loader.from_pretrained('someone/not-cached')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "downloading it from the hub failed" in out.stderr


def test_an_unreachable_hub_fails_in_one_line(tmp_path):
    """Without a network (here, a hub address that refuses connections), a hub id that is not in the cache fails
    at once, in one line: no retries, each with a line of its own."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path)}
    cmd = [sys.executable, "eval.py", "--model", "someone/not-cached", "--text", "README.md"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: 'someone/not-cached' is not a local path, and downloading it from the hub")


SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py"))
PACKAGE = ROOT / "gemma3_int4"
# dotted below the package: "quant", "formats.gguf"
LIBRARY = sorted(".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py")
                 if p.stem != "__init__")  # fmt: skip
MODULES = LIBRARY + SCRIPTS


def module_path(module: str) -> Path:
    return ROOT / (f"{module}.py" if module in SCRIPTS else f"gemma3_int4/{module.replace('.', '/')}.py")


def imported_modules(node: ast.AST, importer: str = "") -> list[str]:
    """Which of our modules an import statement in `importer` names: `import convert`, `from gemma3_int4 import
    quant`, `from gemma3_int4.formats.gguf import X`, and inside the package `from . import quant`, `from .quant
    import X`, in formats/ `from .. import quant`, `from ..config import X`, `from .hf import X`."""
    if isinstance(node, ast.Import):
        return [a.name.removeprefix("gemma3_int4.") for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: from the importer's package, one level up per dot after the first
        package = importer.split(".")[:-1]
        base = package[: len(package) - node.level + 1]
    else:
        base = [] if node.module == "gemma3_int4" else node.module.removeprefix("gemma3_int4.").split(".")
    if node.level and node.module:
        base = base + node.module.split(".")
    names = [".".join([*base, a.name]) for a in node.names]
    if node.module in (None, "gemma3_int4") or all(n in LIBRARY for n in names):  # modules imported by name
        return names
    return [".".join(base)]


# Imports go one way, down this list: each module imports ours only from the layers below its own, at the top
# of the file (no import deferred into a function to dodge a cycle), and no module imports a script.
LAYERS = [
    {"config", "files", "hugepages"},  # import nothing of ours
    {"w4a8"},
    {"cpu_kernels"},  # the CPU kernels of quant's layers, and when each runs
    {"quant"},
    {"attention"},  # masks, the KV cache, attend: imports nothing of ours
    {"vision", "hf_tokenizer", "formats.config_json", "formats.packed_int4", "qat"},
    {"formats.gguf_blocks", "formats.orbax", "formats.torchao"},
    {"formats.gguf"},
    {"formats.awq", "formats.compressed_tensors"},
    {"formats.hf"},
    {"model", "checkpoint"},
    {"gemma4_vision"},  # Gemma 4's towers, built from model.py's pieces
    {"gemma4_audio"},
    {"gemma4"},  # Gemma 4's decoder, built from model.py's pieces
    {"tokenizer", "loader"},
    {"generation", "ptq"},
    {"engine"},  # the server's engine thread
    {"openai_api", "gate"},  # the server's parts
    {"cli", "server", "harness"},
    {"generate", "chat", "eval", "convert", "serve", "finetune"},  # the scripts
]


def test_imports_go_one_way():
    assert set().union(*LAYERS) == set(MODULES), "a new module needs a place in LAYERS"
    layer = {m: i for i, group in enumerate(LAYERS) for m in group}
    for module in MODULES:
        for node in ast.walk(ast.parse(module_path(module).read_text())):
            for name in (n for n in imported_modules(node, module) if n in layer):
                assert layer[name] < layer[module], f"{module} imports {name}, which is not below it"
                assert node.col_offset == 0, f"{module} imports {name} inside a function"


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_first(module):
    """Whichever of our modules a script or a user imports first, it imports (with what it needs)."""
    ours = lambda name: name == "gemma3_int4" or name.startswith("gemma3_int4.") or name in SCRIPTS
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if ours(m)}
    try:
        importlib.import_module(module if module in SCRIPTS else f"gemma3_int4.{module}")
    finally:
        for m in [m for m in sys.modules if ours(m)]:
            sys.modules.pop(m)
        sys.modules.update(saved)


@pytest.mark.parametrize(
    "script", ["generate.py", "chat.py", "eval.py", "convert.py", "finetune.py", "bench/speed.py", "bench/crossover.py"]
)
def test_scripts_turn_on_huge_pages_before_torch_loads(script):
    """PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first allocation: a script imports hugepages before torch
    and before any of our modules (which import torch)."""
    tree = ast.parse((ROOT / script).read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and n.col_offset == 0]
    names = [name for node in imports for name in (imported_modules(node) or [node.module])]
    assert next(n for n in names if n in {"torch", *MODULES}) == "hugepages", names
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    probe = "import os; from gemma3_int4 import hugepages; assert os.environ['THP_MEM_ALLOC_ENABLE'] == '1'"
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env).returncode == 0


def test_a_cached_ranker_that_does_not_fit_the_head_is_a_clear_error(tmp_path):
    from gemma3_int4.checkpoint import RANKER, read_ranker

    assert read_ranker(tmp_path, 64, 96) is None  # none cached: the head's ranker is quantized on load
    fits = {"int4_data": torch.zeros(64, 48, dtype=torch.int8), "scales": torch.ones(64, 3, dtype=torch.bfloat16)}
    save_file(fits, tmp_path / RANKER)
    assert read_ranker(tmp_path, 64, 96).keys() == fits.keys()
    save_file({**fits, "scales": torch.ones(64, 2)}, tmp_path / RANKER)
    with pytest.raises(ValueError, match=r"ranker.safetensors holds .*scales \(64, 2\).*delete it to recompute"):
        read_ranker(tmp_path, 64, 96)
    (tmp_path / RANKER).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_ranker(tmp_path, 64, 96)


def test_hub_downloads_pickles_only_from_a_repo_without_safetensors(monkeypatch):
    """torchao's pickled releases are fetched, but a repo holding both formats is not downloaded twice."""
    from types import SimpleNamespace

    import huggingface_hub

    listings = {"a/safe": ["config.json", "model.safetensors", "pytorch_model.bin"], "a/pickled": ["pytorch_model.bin"]}
    info = lambda repo: SimpleNamespace(siblings=[SimpleNamespace(rfilename=name) for name in listings[repo]])
    monkeypatch.setattr(huggingface_hub, "model_info", info)
    assert checkpoint.hub_patterns("a/safe") == checkpoint.HUB_FILES
    assert checkpoint.hub_patterns("a/pickled") == [*checkpoint.HUB_FILES, PICKLED]
    assert checkpoint.hub_patterns("a/unknown") == [*checkpoint.HUB_FILES, PICKLED]  # lookup failed
