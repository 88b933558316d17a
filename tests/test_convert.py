"""convert.py's serving formats: AWQ, compressed-tensors and dense bf16 out (and back in), checked against
independent readers (AutoAWQ's unpacking, the compressed-tensors library, transformers)."""

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY, hf_multimodal_model, hf_text_model, int4_checkpoint, run_main
from safetensors.torch import load_file, save_file

import convert
from gemma3_int4 import loader, ptq, quant
from gemma3_int4.config import TEXT_VOCAB_SIZE
from gemma3_int4.formats import awq, packed_int4
from gemma3_int4.formats.hf import (
    decode_int4_layouts,
    encode_int4_layout,
    our_name,
    read_safetensors,
    weight_files,
    write_shards,
)
from gemma3_int4.loader import load_checkpoint
from gemma3_int4.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, TINY["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(0))


def run_convert(*args):
    return run_main(convert, *args)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """export(src, to) -> the directory convert.py wrote (in-process, each conversion once per module)."""
    done = {}

    def run(src: Path, to: str) -> Path:
        if (src, to) not in done:
            done[src, to] = tmp_path_factory.mktemp("export") / to
            convert.convert(str(src), done[src, to], to)
        return done[src, to]

    return run


def stored(directory: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(weight_files(directory))


@pytest.fixture(scope="module")
def multimodal_int4_dir(tmp_path_factory, tokenizer_file) -> Path:
    directory = tmp_path_factory.mktemp("mm") / "gemma-3-tiny-mm-int4"
    int4_checkpoint(hf_multimodal_model(), directory)
    (directory / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    return directory


@pytest.mark.parametrize("to", ["awq", "compressed-tensors", "dense"])
@pytest.mark.parametrize("multimodal", [False, True])
def test_round_trip_is_bit_exact(to, multimodal, tiny_int4_dir, multimodal_int4_dir, export):
    """int4 -> FORMAT -> int4 gives back every int4 tensor bit for bit (the bf16 embedding, and for dense every
    weight, by recovering its int4 grid), and the vision tower unchanged; the tokenizer travels along."""
    src = multimodal_int4_dir if multimodal else tiny_int4_dir
    back = export(export(src, to), "int4")
    assert stored(back).keys() == stored(src).keys()
    for name, t in stored(src).items():
        assert torch.equal(stored(back)[name], t), name
    assert (back / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert json.loads((back / "config.json").read_text()).get("quantization_config") is None


def awq_reference_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's own recipe (awq/utils/packing_utils.py): shift out 8 nibbles, undo the order with
    AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7], subtract the zeros, multiply by the scales; (N, K) out."""
    shifts = torch.arange(0, 32, 4)
    reverse = [0, 4, 1, 5, 2, 6, 3, 7]

    def unpack(x):
        nibbles = (x[:, :, None] >> shifts[None, None, :]).to(torch.int8)
        return (nibbles.view(x.shape[0], -1, 8)[:, :, reverse].reshape(x.shape[0], -1)) & 0xF

    iweight, izeros = unpack(qweight), unpack(qzeros)
    groups = qweight.shape[0] // qzeros.shape[0]
    w = (iweight - izeros.repeat_interleave(groups, 0)) * scales.repeat_interleave(groups, 0)
    return w.t()


def test_awq_export_is_autoawq_layout(tiny_int4_dir, export):
    exported = export(tiny_int4_dir, "awq")
    config = json.loads((exported / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["zero_point"]) == ("awq", 4, 32, True)
    assert q["version"] == "gemm"
    src, out = stored(tiny_int4_dir), stored(exported)
    module = "model.layers.3.mlp.down_proj"
    qweight, qzeros, scales = (out[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales"))
    n, k = src[f"{module}.weight.int4_data"].shape[0], src[f"{module}.weight.int4_data"].shape[1] * 2
    assert qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.bfloat16
    assert qweight.shape == (k, n // 8) and qzeros.shape == (k // 32, n // 8) and scales.shape == (k // 32, n)
    assert (qzeros == torch.tensor(0x88888888 - 2**32, dtype=torch.int32)).all()
    ours = quant.dequantize_int4(src[f"{module}.weight.int4_data"], src[f"{module}.weight.scales"])
    assert torch.equal(awq_reference_unpack(qweight, qzeros, scales), ours)
    assert out["model.embed_tokens.weight"].dtype == torch.bfloat16  # AWQ has no int4 embedding
    assert not any(k.startswith("model.embed_tokens.q") for k in out)


def test_compressed_tensors_library_decompresses_our_export(multimodal_int4_dir, export):
    """The compressed-tensors library parses our quantization_config and decompresses every weight to exactly
    our dequantized weight (bf16, as both compute it)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    exported = export(multimodal_int4_dir, "compressed-tensors")
    config = json.loads((exported / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(config)
    assert config.format == "pack-quantized" and config.quantization_status == "compressed"
    scheme = config.config_groups["group_0"]
    src, out = stored(multimodal_int4_dir), stored(exported)
    modules = [k.removesuffix(".weight_packed") for k in out if k.endswith(".weight_packed")]
    assert len(modules) == 7 * TINY["num_hidden_layers"]  # every linear of the language model, nothing else
    for module in modules:
        parts = {k: out[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
        decompressed = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
        expected = quant.dequantize_int4(src[f"{module}.weight.int4_data"], src[f"{module}.weight.scales"])
        assert torch.equal(decompressed, expected), module
    assert all(k.startswith(("vision_tower", "multi_modal_projector", "language_model")) for k in out)


def test_transformers_loads_the_dense_export(multimodal_int4_dir, export):
    """--to dense writes what transformers loads as it loads Google's checkpoints; its logits equal ours."""
    from transformers import Gemma3ForConditionalGeneration

    exported = export(multimodal_int4_dir, "dense")
    hf = Gemma3ForConditionalGeneration.from_pretrained(exported, dtype=torch.float32, attn_implementation="eager")
    ours = loader.from_pretrained(exported, dtype=torch.float32, weights="dense")
    with torch.no_grad():
        diff = (ours(IDS) - hf(IDS).logits)[..., :TEXT_VOCAB_SIZE].abs().max().item()  # ours masks the padding
    assert diff < 1e-3


def test_transformers_loads_the_compressed_tensors_export(tiny_int4_dir, export):
    """transformers (with the compressed-tensors library) loads our W4A16 export: its logits equal ours on the
    same file read dense (the int4 linears dequantized exactly, the bf16 embedding as it is)."""
    from transformers import AutoModelForCausalLM

    exported = export(tiny_int4_dir, "compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ours = loader.from_pretrained(exported, dtype=torch.float32, weights="dense")
    with torch.no_grad():
        diff = (ours(IDS) - hf(IDS).logits).abs().max().item()
    assert diff < 1e-4


def awq_dir(tmp_path: Path, zeros: int | None, group_size: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny text model as AutoAWQ writes it, with the given zero point (None: random ones) and group size; and
    its dense weights."""
    hf = hf_text_model(hidden_size=128, intermediate_size=256)  # K a multiple of 128 everywhere
    tensors, dense = {}, {}
    g = torch.Generator().manual_seed(0)
    for name, w in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        if w.dim() == 2 and "embed_tokens" not in name:
            n, k = w.shape
            q = torch.randint(0, 16, (n, k), generator=g)
            z = (
                torch.randint(0, 16, (n, k // group_size), generator=g)
                if zeros is None
                else torch.full((n, k // group_size), zeros)
            )
            s = (torch.rand(n, k // group_size, generator=g) / 50).to(torch.bfloat16)
            module = name.removesuffix(".weight")
            tensors[f"{module}.qweight"] = packed_int4.pack_nibbles(q.t(), awq.ORDER)
            tensors[f"{module}.qzeros"] = packed_int4.pack_nibbles(z.t(), awq.ORDER)
            tensors[f"{module}.scales"] = s.t().contiguous()
            parts = tensors[f"{module}.qweight"], tensors[f"{module}.qzeros"], tensors[f"{module}.scales"].float()
            dense[name] = awq_reference_unpack(*parts)
        else:
            tensors[name] = dense[name] = w.to(torch.bfloat16)
    tmp_path.mkdir()
    save_file(tensors, tmp_path / "model.safetensors")
    config = hf.config.to_dict() | {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                                            "zero_point": True, "version": "gemm"}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path, dense


def test_awq_in_symmetric_group_128_is_lossless(tmp_path):
    """AutoAWQ checkpoints use groups of 128: with zero point 8 each scale covers 4 of our groups exactly."""
    directory, dense = awq_dir(tmp_path / "awq", zeros=8, group_size=128)
    _, tensors, _ = load_checkpoint(directory)
    w = dense["model.layers.2.mlp.up_proj.weight"]
    data, scales = tensors["layers.2.mlp.up_proj.int4_data"], tensors["layers.2.mlp.up_proj.scales"]
    assert scales.shape == (w.shape[0], w.shape[1] // 32)
    assert torch.equal(quant.dequantize_int4(data, scales.float()), w)


def test_awq_zero_points_load_exactly_and_go_back_out(tmp_path, tokenizer_file):
    """Real zero points (random, groups of 128) load exactly as int4 with zeros = (8 - zp) * scale, over 4 of our
    groups each; the model keeps them, and exported to AWQ and compressed-tensors they are the same integers."""
    directory, dense = awq_dir(tmp_path / "awq", zeros=None, group_size=128)
    _, tensors, _ = load_checkpoint(directory)
    up = "layers.2.mlp.up_proj"
    assert tensors[f"{up}.zeros"].shape == tensors[f"{up}.scales"].shape == (256, 128 // 32)
    assert torch.equal(quant.dequantize(tensors, up), dense["model.layers.2.mlp.up_proj.weight"].float())
    ours = loader.from_pretrained(directory, dtype=torch.float32)
    assert (
        isinstance(ours.layers[2].mlp.gate_up_proj, quant.Int4Linear)
        and ours.layers[2].mlp.gate_up_proj.zeros is not None
    )
    x = torch.randn(1, 3, 128)
    w = torch.cat([dense[f"model.layers.2.mlp.{p}_proj.weight"].float() for p in ("gate", "up")])
    torch.testing.assert_close(ours.layers[2].mlp.gate_up_proj(x), x @ w.t(), rtol=1e-5, atol=1e-5)
    for layout in ("awq", "compressed-tensors"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # integer zero points: nothing quantized again
            convert.convert(str(directory), tmp_path / f"out-{layout}", layout, tokenizer=tokenizer_file)
        _, back, _ = load_checkpoint(tmp_path / f"out-{layout}")
        for part in ("int4_data", "scales", "zeros"):
            assert torch.equal(back[f"{up}.{part}"].float(), tensors[f"{up}.{part}"].float()), (layout, part)
    # the compressed-tensors library reads the zero points we wrote (asymmetric scheme, packed along N)
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    exported = tmp_path / "out-compressed-tensors"
    config = QuantizationConfig.model_validate(
        json.loads((exported / "config.json").read_text())["quantization_config"]
    )
    scheme = config.config_groups["group_0"]
    assert scheme.weights.symmetric is False
    out = stored(exported)
    parts = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
    module = "model.layers.2.mlp.up_proj"
    decompressed = PackedQuantizationCompressor.decompress({k: out[f"{module}.{k}"] for k in parts}, scheme)["weight"]
    assert torch.equal(decompressed, quant.dequantize(tensors, up).to(decompressed.dtype))


def test_float_zero_points_are_refitted_as_integers(tiny_int4_dir, tokenizer_file, tmp_path, monkeypatch):
    """Zero points that AWQ and compressed-tensors cannot hold (a GGUF's Q4_K minimums: any float) are refitted per
    group with integer zero points against the weights they give (quant.quantize_int4_asymmetric), far closer than
    symmetric rounding is, and activation-aware: each column's error weighted by its inputs' mean square on the
    calibration text, which the refit lowers below the unweighted refit's; one warning names the error, printed as
    one line by the scripts."""
    from gemma3_int4 import cli

    src = tmp_path / "src"
    tensors = stored(tiny_int4_dir)
    module = "model.layers.1.mlp.down_proj.weight"
    w = quant.dequantize_int4(tensors[f"{module}.int4_data"], tensors[f"{module}.scales"].float())
    w = w + torch.linspace(0, 0.05, w.shape[0])[:, None]  # shifted rows: asymmetric groups
    parts = quant.quantize_int4_asymmetric(w)  # float zeros: not whole multiples of the scales
    tensors |= dict(zip([f"{module}.int4_data", f"{module}.scales", f"{module}.zeros"], parts, strict=True))
    write_shards(tensors, src)
    shutil.copy(tiny_int4_dir / "config.json", src)
    source = quant.dequantize_int4(parts[0], parts[1].float(), parts[2])  # as the checkpoint gives it
    data, scales, zeros = quant.quantize_int4_asymmetric(source, integer_zero_points=True)
    unweighted = quant.dequantize_int4(data, scales.float(), zeros)
    config, ours, _ = load_checkpoint(src)
    calibration = ptq.calibration_ids(Tokenizer.from_file(tokenizer_file), None, *convert.REFIT_CALIBRATION)
    column_weights = ptq.input_mean_squares(config, ours, calibration)["layers.1.mlp.down_proj"]
    symmetric = quant.dequantize_int4(*quant.quantize_int4(source)).float()
    for layout in ("awq", "compressed-tensors"):
        message = (
            rf"^1 weight.s. \(model.layers.1.mlp.down_proj.weight, ...\) have zero points that {layout} "
            r"cannot hold .* refitted with integer zero points, [\d.]+% relative RMS error against their weights$"
        )
        with pytest.warns(UserWarning, match=message):
            convert.convert(str(src), tmp_path / layout, layout, tokenizer=tokenizer_file)
        _, back, _ = load_checkpoint(tmp_path / layout)
        got = quant.dequantize(back, "layers.1.mlp.down_proj")
        weighted = [((w - source).square() * column_weights).sum() for w in (got, unweighted)]
        assert weighted[0] < 0.98 * weighted[1]
        assert (got - source).square().sum() < 0.75 * (symmetric - source).square().sum()
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    cli.one_line_warnings()
    assert warnings.formatwarning("a message", UserWarning, "checkpoint.py", 7, "code") == "warning: a message\n"


def test_int8_weights_are_kept_unquantized(tiny_int4_dir, tokenizer_file, tmp_path):
    """Weights held above 4 bits (int8: a GGUF's Q5_0 to Q8_0) are written bf16 and listed as not quantized
    (AWQ's modules_to_not_convert, compressed-tensors' ignore): they read back exactly, weights="auto" keeps them
    at 8 bits again, and transformers loads the compressed-tensors export as we do."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    tensors = stored(tiny_int4_dir)
    module = "model.layers.0.mlp.up_proj.weight"
    w = quant.dequantize_int4(tensors.pop(f"{module}.int4_data"), tensors.pop(f"{module}.scales").float())
    w = w + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))  # off any int4 grid
    tensors[f"{module}.int8_data"], tensors[f"{module}.scales"] = quant.quantize_int8(w)
    embed = "model.embed_tokens.weight"  # and an int8 embedding (a GGUF's Q8_0)
    w = quant.dequantize_int4(tensors.pop(f"{embed}.int4_data"), tensors.pop(f"{embed}.scales").float())
    tensors[f"{embed}.int8_data"], tensors[f"{embed}.scales"] = quant.quantize_int8(w)
    write_shards(tensors, src)
    shutil.copy(tiny_int4_dir / "config.json", src)
    expected = quant.dequantize_int8(tensors[f"{module}.int8_data"], tensors[f"{module}.scales"]).to(torch.bfloat16)
    for layout, listed in (("awq", "modules_to_not_convert"), ("compressed-tensors", "ignore")):
        convert.convert(str(src), tmp_path / layout, layout, tokenizer=tokenizer_file)
        config = json.loads((tmp_path / layout / "config.json").read_text())
        assert {"model.layers.0.mlp.up_proj", "model.embed_tokens"} <= set(config["quantization_config"][listed])
        assert torch.equal(stored(tmp_path / layout)[module], expected)
        _, back, above_4_bits = load_checkpoint(tmp_path / layout)
        assert above_4_bits == {"layers.0.mlp.up_proj.weight", "embed.weight"}
        assert torch.equal(back["layers.0.mlp.up_proj.weight"], expected)
        auto = loader.convert_weights(back, "auto", above_4_bits)
        assert auto["layers.0.mlp.up_proj.int8_data"].dtype == auto["embed.int8_data"].dtype == torch.int8
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed-tensors", dtype=torch.float32).eval()
    ours = loader.from_pretrained(tmp_path / "compressed-tensors", dtype=torch.float32, weights="dense")
    with torch.no_grad():
        assert (ours(IDS) - hf(IDS).logits).abs().max().item() < 1e-4


def test_zero_points_of_rows_not_a_multiple_of_8_are_padded():
    """compressed-tensors packs zero points eight rows to an int32: 12 rows take two words, the last half empty."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (12, 64), generator=gen)
    zp = torch.randint(0, 16, (12, 2), generator=gen)
    scales = (torch.rand(12, 2, generator=gen) / 50).to(torch.bfloat16)
    ours = {f"m.weight.{k}": v for k, v in packed_int4.int4_pair(q, zp, scales, torch.arange(64) // 32).items()}
    out, config = encode_int4_layout(ours, "compressed-tensors", multimodal=False)
    assert out["m.weight_zero_point"].shape == (2, 2)
    back = decode_int4_layouts(out, config)
    assert all(torch.equal(back[k].float(), ours[k].float()) for k in ours)


def test_bad_inputs_give_clear_errors(tiny_int4_dir, export, tmp_path):
    out = run_convert(tiny_int4_dir, tmp_path / "x", "--to", "exl2")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    awq_dir = tmp_path / "awq"
    shutil.copytree(export(tiny_int4_dir, "awq"), awq_dir)
    out = run_convert(tiny_int4_dir, awq_dir, "--to", "awq")
    assert out.returncode == 1 and "already exists" in out.stderr
    config = json.loads((awq_dir / "config.json").read_text())
    for bad, message in [({"quant_method": "gptq"}, "quant_method 'gptq'"), ({"bits": 8}, "bits=8")]:
        broken = config | {"quantization_config": config["quantization_config"] | bad}
        (awq_dir / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            convert.convert(str(awq_dir), tmp_path / "again", "int4")
    (awq_dir / "config.json").write_text(json.dumps(config))
    shard = next(awq_dir.glob("*.safetensors"))
    tensors = load_file(shard)
    del tensors[next(k for k in tensors if k.endswith(".qzeros"))]
    save_file(tensors, shard)
    out = run_convert(awq_dir, tmp_path / "again", "--to", "int4")
    assert out.returncode == 1 and "comes without" in out.stderr and "qzeros" in out.stderr
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".again*"))


def test_help_names_the_default_model():
    out = run_convert("--help")
    assert out.returncode == 0 and "python convert.py gemma-3-270m " in out.stdout
    assert "gemma-3-270m: the embedded default model" in " ".join(out.stdout.split())


def test_tokenizer_and_generation_files_travel_along(tiny_int4_dir, tokenizer_file, tmp_path):
    """A serving engine reads the chat template, tokenizer and generation defaults from the checkpoint directory:
    the source's are copied into the export, unless --tokenizer replaces the tokenizer."""
    src = tmp_path / "src"
    shutil.copytree(tiny_int4_dir, src)
    files = {"tokenizer_config.json": '{"chat_template": "{{ messages }}"}', "generation_config.json": '{"top_k": 64}'}
    for name, text in files.items():
        (src / name).write_text(text)
    convert.convert(str(src), tmp_path / "awq", "awq")
    assert all((tmp_path / "awq" / name).read_text() == text for name, text in files.items())
    convert.convert(str(src), tmp_path / "other", "dense", tokenizer=tokenizer_file)
    assert not any((tmp_path / "other" / name).read_text() == text for name, text in files.items())  # ours instead
    assert "chat_template" not in json.loads((tmp_path / "other" / "tokenizer_config.json").read_text())


# A Gemma-style chat template (Google's, without its system-prompt and image branches)
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TEXTS = ["The quick brown fox.", "  two  spaces\n\n\tand a tab", "naïve café 日本語 🦀", "x = f(3.14)\n"]


@pytest.mark.parametrize("to", ["dense", "awq", "compressed-tensors"])
def test_transformers_tokenizes_and_generates_from_the_export_as_we_do(to, tiny_int4_dir, tmp_path):
    """An export carries what transformers (and so vLLM and SGLang) need to tokenize as we do, <bos> included,
    apply the chat template and stop where we stop: tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    generation_config.json; every file readable by all, as any checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma3_int4.generation import Sampling, generate
    from gemma3_int4.tokenizer import Tokenizer

    src = tmp_path / "src"
    shutil.copytree(tiny_int4_dir, src)
    (src / "chat_template.jinja").write_text(TEMPLATE)
    exported = tmp_path / to
    convert.convert(str(src), exported, to)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (exported / name).is_file(), name
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in exported.iterdir())  # not 0600
    ours, theirs = Tokenizer.from_pretrained(exported), AutoTokenizer.from_pretrained(exported)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text, bos=True), text
        assert theirs.decode(ours.encode(text)) == text
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is a dict?"}]  # fmt: skip
    prompt = ours.chat_prompt([{**m, "role": "model" if m["role"] == "assistant" else "user"} for m in messages])
    assert theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"] == prompt
    if to == "awq":  # transformers runs AWQ only with AutoAWQ's kernels (a GPU): the tokenizer is what we check
        return
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    model = loader.from_pretrained(exported, dtype=torch.float32, weights="dense")
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :].tolist()
    assert list(generate(model, prompt, 12, Sampling(temperature=0), ours.stop_ids)) == expected


def test_a_gguf_export_carries_the_chat_template(tiny_int4_dir, tmp_path):
    """llama.cpp applies the chat template of a GGUF's metadata: the source's travels into it."""
    from gemma3_int4.checkpoint import chat_template

    src = tmp_path / "src"
    shutil.copytree(tiny_int4_dir, src)
    convert.convert(str(src), tmp_path / "plain.gguf", "gguf")
    assert chat_template(tmp_path / "plain.gguf") is None
    (src / "chat_template.jinja").write_text(TEMPLATE)
    convert.convert(str(src), tmp_path / "chat.gguf", "gguf")
    assert chat_template(tmp_path / "chat.gguf") == TEMPLATE


def test_the_tokenizer_of_an_export_loads_without_protobuf_or_tokenizer_model(tiny_int4_dir, export, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    """transformers reads tokenizer.model through protobuf (and fails without it); tokenizer.json needs neither."""
    from transformers import AutoTokenizer

    from gemma3_int4.tokenizer import Tokenizer

    exported = tmp_path / "dense"
    shutil.copytree(export(tiny_int4_dir, "dense"), exported)
    (exported / "tokenizer.model").unlink()
    monkeypatch.setitem(sys.modules, "google.protobuf", None)  # import google.protobuf fails
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    theirs = AutoTokenizer.from_pretrained(exported)
    ours = Tokenizer.from_pretrained(tiny_int4_dir)
    assert [theirs(text)["input_ids"] for text in TEXTS] == [ours.encode(text, bos=True) for text in TEXTS]


@pytest.mark.parametrize("kind", ["symmetric", "activation order", "zero points"])
def test_compressed_tensors_in_as_llm_compressor_writes_it(kind, tmp_path):
    """A W4A16 checkpoint packed by the compressed-tensors library itself: symmetric groups load exactly as int4,
    real zero points exactly as int4 with zeros; activation-ordered groups (weight_g_idx) as the weights they
    stand for."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    hf = hf_text_model()
    tensors, expected = {}, {}
    g = torch.Generator().manual_seed(0)
    for name, w in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        if w.dim() != 2 or "embed_tokens" in name:
            tensors[name] = w.to(torch.bfloat16)
            continue
        n, k = w.shape
        module = name.removesuffix(".weight")
        q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        scales = (torch.rand(n, k // 32, generator=g) / 50).to(torch.bfloat16)
        group_of = torch.arange(k) // 32
        zeros = torch.zeros(n, k // 32, dtype=torch.int8)
        if kind == "activation order":
            group_of = group_of[torch.randperm(k, generator=g)]
            tensors[f"{module}.weight_g_idx"] = group_of.to(torch.int32)
        if kind == "zero points":
            zeros = torch.randint(-3, 4, (n, k // 32), generator=g, dtype=torch.int8)
            tensors[f"{module}.weight_zero_point"] = pack_to_int32(zeros, 4, packed_dim=0)
        tensors[f"{module}.weight_packed"] = pack_to_int32(q, 4)
        tensors[f"{module}.weight_scale"] = scales
        tensors[f"{module}.weight_shape"] = torch.tensor([n, k])
        expected[name] = (q.float() - zeros.float()[:, group_of]) * scales.float()[:, group_of]
    (tmp_path / "ct").mkdir()
    save_file(tensors, tmp_path / "ct" / "model.safetensors")
    weights = {"num_bits": 4, "type": "int", "symmetric": kind != "zero points", "strategy": "group", "group_size": 32}
    quantization = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}  # fmt: skip
    config = hf.config.to_dict() | {"quantization_config": quantization}
    (tmp_path / "ct" / "config.json").write_text(json.dumps(config))
    _, ours, _ = load_checkpoint(tmp_path / "ct")
    for name, w in expected.items():
        module = our_name(name).removesuffix(".weight")
        if kind == "activation order":
            assert torch.equal(ours[f"{module}.weight"], w), name
        else:
            assert (f"{module}.zeros" in ours) == (kind == "zero points")
            assert torch.equal(quant.dequantize(ours, module), w), name
