"""GGUF in and out on tiny models: int4 -> GGUF -> int4 is bit-exact; bad files give clear errors."""

import shutil
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import run_main

import convert
from gemma3_int4 import checkpoint, hf_tokenizer, loader, quant
from gemma3_int4.formats import gguf as gguf_format
from gemma3_int4.formats import gguf_blocks
from gemma3_int4.loader import load_checkpoint
from gemma3_int4.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def run_convert(*args):
    return run_main(convert, *args)


def test_int4_to_gguf_to_int4_is_bit_exact(tiny_int4_dir, tmp_path):
    out = run_convert(tiny_int4_dir, tmp_path / "tiny.gguf", "--to", "gguf")
    assert out.returncode == 0, out.stderr
    src_config, src, _ = load_checkpoint(tiny_int4_dir)
    config, back, above_4_bits = load_checkpoint(tmp_path / "tiny.gguf")
    assert above_4_bits == set()
    assert set(back) == set(src)
    for name, t in src.items():
        if name.endswith(("int4_data", "scales")):
            assert torch.equal(back[name].float(), t.float()) and back[name].dtype in (t.dtype, torch.float16), name
        else:  # norms: bf16 in the checkpoint, F32 (1 + w) in the GGUF
            assert torch.equal(back[name], t.float()), name
    assert config.query_pre_attn_scalar == src_config.query_pre_attn_scalar == 24
    assert config.rope_scale_global == 8.0 and config.global_layers == src_config.global_layers
    ids = torch.randint(0, 512, (1, 30))
    a = loader.from_pretrained(tiny_int4_dir, dtype=torch.float32)(ids)
    b = loader.from_pretrained(tmp_path / "tiny.gguf", dtype=torch.float32)(ids)
    assert (a - b).abs().max().item() < 1e-4  # only the stored rms eps differs (float32 in GGUF)
    # and back to our safetensors layout
    out = run_convert(tmp_path / "tiny.gguf", tmp_path / "again", "--to", "int4")
    assert out.returncode == 0, out.stderr
    _, again, _ = load_checkpoint(tmp_path / "again")
    assert all(torch.equal(again[k], back[k]) for k in back if k.endswith("int4_data"))


def test_gguf_tokenizer_round_trip(tiny_int4_dir, tmp_path, tokenizer_file):
    run_convert(tiny_int4_dir, tmp_path / "tiny.gguf", "--to", "gguf")
    ours, theirs = Tokenizer.from_file(tokenizer_file), Tokenizer.from_pretrained(tmp_path / "tiny.gguf")
    for text in ["Hello  world", "naïve café 日本語 🦀", "def f(x):\n    return x"]:
        assert theirs.encode(text) == ours.encode(text)
    proto = tokenizer_file.read_bytes()
    assert hf_tokenizer.parse_sentencepiece_proto(gguf_format.tokenizer_proto(tmp_path / "tiny.gguf")) == [
        (p, pytest.approx(s), t) for p, s, t in hf_tokenizer.parse_sentencepiece_proto(proto)
    ]


def test_q4_0_bytes_follow_llama_cpp(tmp_path):
    """Our Q4_0 blocks decode, by gguf's own dequantizer, to exactly our dequantized weights."""
    data, scales = quant.quantize_int4(torch.randn(16, 128))
    blocks, exact = gguf_blocks.q4_0_blocks(data, scales)
    assert exact
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(theirs, quant.dequantize_int4(data, scales.float()).numpy())
    data8, scales8 = quant.quantize_int8(torch.randn(16, 128))
    theirs8 = gguf.quants.dequantize(gguf_blocks.q8_0_blocks(data8, scales8), gguf.GGMLQuantizationType.Q8_0)
    ours8 = quant.dequantize_int8(data8, scales8.half().float()).numpy()
    assert np.array_equal(theirs8, ours8)


def test_bf16_scales_that_fp16_cannot_hold(tmp_path):
    data, scales = quant.quantize_int4(torch.randn(4, 64))
    small = scales.clone()
    small[0, 0] = torch.tensor(1.0078125 * 2**-20, dtype=torch.bfloat16)  # subnormal in fp16: bits lost
    assert not gguf_blocks.q4_0_blocks(data, small)[1]
    huge = scales.clone()
    huge[0, 0] = 1e6
    with pytest.raises(ValueError, match="outside float16's range"):
        gguf_blocks.q4_0_blocks(data, huge)


def test_inexact_scales_fall_back_to_f32(tiny_int4_dir, tmp_path):
    config, tensors, _ = load_checkpoint(tiny_int4_dir)
    tensors["layers.0.mlp.up_proj.scales"][0, 0] = 1.0078125 * 2**-20
    tokenizer = (tiny_int4_dir / "tokenizer.model").read_bytes()
    with pytest.warns(UserWarning, match="layers.0.mlp.up_proj: scales are not exact in fp16"):
        gguf_format.write(config, tensors, tokenizer, tmp_path / "x.gguf")
    _, back, _ = load_checkpoint(tmp_path / "x.gguf")
    up = "layers.0.mlp.up_proj"
    expected = quant.dequantize_int4(tensors[f"{up}.int4_data"], tensors[f"{up}.scales"].float())
    assert torch.equal(back[f"{up}.weight"], expected)


def test_bad_gguf_files(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 40)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        loader.from_pretrained(tmp_path / "junk.gguf")
    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture is 'llama', not 'gemma3'"):
        loader.from_pretrained(tmp_path / "llama.gguf")


def test_convert_errors_leave_nothing_behind(tiny_int4_dir, tmp_path):
    (tmp_path / "exists.gguf").write_bytes(b"keep me")
    out = run_convert(tiny_int4_dir, tmp_path / "exists.gguf", "--to", "gguf")
    assert out.returncode == 1 and "already exists" in out.stderr
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep me"
    out = run_convert(tmp_path / "missing", tmp_path / "out.gguf", "--to", "gguf")
    assert out.returncode == 1 and "no such checkpoint" in out.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "exists.gguf"]


def q4_k_blocks(n: int, k: int, gen: torch.Generator) -> np.ndarray:
    """Random Q4_K bytes (n, k/256 * 144): fp16 d and dmin, 12 bytes of 6-bit sub-block scales and minimums, 128
    bytes of nibbles: any bytes are a valid block once d and dmin are sane numbers."""
    blocks = torch.randint(0, 256, (n, k // 256, 144), generator=gen, dtype=torch.uint8)
    halves = (torch.rand(n, k // 256, 2, generator=gen) * 1e-3 + 1e-4).to(torch.float16)
    blocks[..., :4] = halves.view(torch.uint8)
    return blocks.reshape(n, -1).numpy()


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_K"])
def test_q4_1_and_q4_k_load_exactly_as_int4_with_zeros(kind):
    """A scale and a minimum per 32 (Q4_K: 6-bit ones under fp16 super-block scales): our q * scale + zero is
    gguf's own dequantization, value for value; Q4_K goes back out as Q4_K."""
    tensor_type = gguf.GGMLQuantizationType[kind]
    gen = torch.Generator().manual_seed(0)
    if kind == "Q4_1":
        raw = gguf.quants.quantize(torch.randn(64, 512, generator=gen).numpy(), tensor_type)
    else:
        raw = q4_k_blocks(64, 512, gen)
    w = torch.from_numpy(gguf.quants.dequantize(raw, tensor_type))
    data, scales, zeros = gguf_blocks.q4_zero_ints(raw, w, tensor_type)
    assert data.shape == (64, 256) and scales.shape == zeros.shape == (64, 512 // 32)
    assert torch.equal(quant.dequantize_int4(data, scales, zeros), w)
    assert bool((zeros != 0).any())
    if kind == "Q4_K":  # and back out as Q4_K, exactly (gguf_blocks.q4_k_blocks finds each block's d and dmin)
        blocks = gguf_blocks.q4_k_blocks(data, scales, zeros)
        assert np.array_equal(gguf.quants.dequantize(blocks, tensor_type), w.numpy())
        assert gguf_blocks.q4_k_blocks(data, scales * (1 + 2**-12), zeros) is None  # no fp16 d fits: not Q4_K


def test_zero_points_go_out_as_q4_1(tmp_path, tiny_int4_dir):
    """int4 with zeros -> Q4_1, read back exactly where d and m fit fp16 (here m = (k - 8) * scale, small k);
    where they do not (a Q4_K source's 17-bit scales), rounded, with a warning that says by how much. An untied
    head travels as output.weight."""
    config, tensors, _ = load_checkpoint(tiny_int4_dir)
    gen = torch.Generator().manual_seed(0)
    up = "layers.0.mlp.up_proj"
    scales = tensors[f"{up}.scales"].to(torch.bfloat16)
    k = torch.randint(6, 11, scales.shape, generator=gen)  # zero - 8 * scale = (k - 8) * scale: fits fp16
    tensors[f"{up}.scales"], tensors[f"{up}.zeros"] = scales, (k * scales.float()).to(torch.bfloat16)
    tensors["lm_head.int4_data"], tensors["lm_head.scales"] = quant.quantize_int4(torch.randn(512, 64, generator=gen))
    config.tie_word_embeddings = False
    tokenizer = (tiny_int4_dir / "tokenizer.model").read_bytes()
    blocks, change = gguf_blocks.q4_1_blocks(
        tensors[f"{up}.int4_data"], tensors[f"{up}.scales"], tensors[f"{up}.zeros"]
    )
    assert change == 0
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    assert np.array_equal(theirs, quant.dequantize(tensors, up).numpy())  # llama.cpp's reading of our bytes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gguf_format.write(config, tensors, tokenizer, tmp_path / "x.gguf")
    back_config, back, _ = load_checkpoint(tmp_path / "x.gguf")
    assert not back_config.tie_word_embeddings and torch.equal(back["lm_head.int4_data"], tensors["lm_head.int4_data"])
    assert torch.equal(back[f"{up}.int4_data"], tensors[f"{up}.int4_data"])
    assert torch.equal(quant.dequantize(back, up), quant.dequantize(tensors, up))
    tensors[f"{up}.scales"] = tensors[f"{up}.scales"].float() * (1 + 2**-12)  # 17 bits: not an fp16
    with pytest.warns(UserWarning, match=r"1 int4 weight\(s\) with zero points written as Q4_1 .* rounded"):
        gguf_format.write(config, tensors, tokenizer, tmp_path / "y.gguf")


def test_a_gguf_is_converted_once_then_loaded_from_the_cache(tiny_int4_dir, tmp_path, monkeypatch, capsys):
    """weights="auto" converts a GGUF into the cache on its first load; later loads read the conversion (the same
    model as converting again); a file changed in place is converted again, and its stale conversion removed."""
    monkeypatch.setenv("GEMMA3_INT4_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    assert run_convert(tiny_int4_dir, path, "--to", "gguf").returncode == 0
    reads = []
    real_read = gguf_format.read
    monkeypatch.setattr(gguf_format, "read", lambda p: reads.append(p) or real_read(p))
    first = loader.from_pretrained(path, dtype=torch.float32).state_dict()
    second = loader.from_pretrained(path, dtype=torch.float32).state_dict()
    assert len(reads) == 1 and capsys.readouterr().err.count("converting tiny.gguf") == 1
    [cached] = (tmp_path / "cache" / "gguf").iterdir()
    with monkeypatch.context() as m:  # no cache to be had: converted as it is, with a warning
        m.setattr(loader, "cached_gguf", lambda p: (_ for _ in ()).throw(PermissionError("read-only cache")))
        with pytest.warns(UserWarning, match="read-only cache: loading tiny.gguf without caching"):
            uncached = loader.from_pretrained(path, dtype=torch.float32).state_dict()
    assert first.keys() == second.keys() == uncached.keys()
    assert all(torch.equal(first[k], second[k]) and torch.equal(first[k], uncached[k]) for k in first)
    path.write_bytes(path.read_bytes())  # rewritten: a new mtime
    loader.from_pretrained(path, dtype=torch.float32)
    assert len(reads) == 3 and not cached.exists() and len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
    assert loader.from_pretrained(path, weights="int4") and len(reads) == 4  # other policies: from the file
    embedded = tmp_path / "cache" / checkpoint.EMBEDDED_GGUF  # the default model's file, by its path: its conversion
    shutil.copy(path, embedded)
    loader.from_pretrained(embedded)
    assert (tmp_path / "cache" / checkpoint.DEFAULT_MODEL_CACHE / "config.json").exists()
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
