"""torchao's checkpoints (PyTorch's int4 releases of Gemma 3): tiny models quantized with the model cards' recipes
by torchao itself, saved pickled (pytorch_model.bin) and as safetensors with metadata, then read by us in a
process where torchao cannot be imported, against transformers running the same weights dequantized."""

import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import hf_text_model

import convert
from gemma3_int4 import loader, quant
from gemma3_int4.formats.hf import our_name, read_tensors
from gemma3_int4.loader import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
torchao = pytest.importorskip("torchao")


def int4_row_quantize_zp(w: torch.Tensor, group_size: int):
    """The asymmetric int4 quantizer Int4Tensor.from_hp calls (mslk's, a GPU kernel library not installable
    here), written out: per group u = round((w - min) / scale) in 0..15 with scale = (max - min) / 15, stored as
    q = u - 8 with zero = min + 8 * scale (so w = q * scale + zero); scale and zero transposed, (K/g, N)."""
    n, k = w.shape
    groups = w.float().view(n, k // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-6) / 15
    q = (torch.round((groups - low) / scale).clamp(0, 15) - 8).to(torch.int8).view(n, k)
    zero = low + 8 * scale
    return q, scale.view(n, -1).t().contiguous(), zero.view(n, -1).t().contiguous()


def mslk_pack_int4(q: torch.Tensor) -> torch.Tensor:
    """mslk's packing: two signed values a byte, element 2j in the low nibble."""
    return (q[..., 1::2] << 4) | (q[..., ::2] & 0xF)


def untied_model():
    """A tiny Gemma 3 with its own output head, in bf16, K = 128 everywhere (the QAT recipe's group size)."""
    hf = hf_text_model(hidden_size=128, intermediate_size=256, head_dim=32, tie_word_embeddings=False)
    with torch.no_grad():
        hf.lm_head.weight.normal_(0.0, 0.1)  # its own weights, not the embedding's
    return hf.to(torch.bfloat16)


def hqq_int8_int4(hf) -> None:
    """pytorch/gemma-3-4b-it-HQQ-INT8-INT4's recipe: every linear (the head included) int8 dynamic activations with
    int4 weights in groups of 32, HQQ scales; the embedding int8 per row."""
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
        quantize_,
    )

    linears = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(32), intx_choose_qparams_algorithm="hqq_scale_only"
    )
    quantize_(hf, linears)
    quantize_(
        hf,
        IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
        lambda m, _: m is hf.model.embed_tokens,
    )


def qat_int4(hf, monkeypatch) -> None:
    """pytorch/gemma-3-12b-it-QAT-INT4's: Int4WeightOnlyConfig(group_size=128), plain packing (Int4Tensor), through
    torchao's own quantize_, with the GPU library's quantizer and packer replaced by the functions above."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    from torchao.quantization.quantize_.workflows.int4 import int4_tensor

    monkeypatch.setattr(int4_tensor, "int4_row_quantize_zp", int4_row_quantize_zp)
    monkeypatch.setattr(int4_tensor, "pack_int4", mslk_pack_int4)
    quantize_(hf, Int4WeightOnlyConfig(group_size=128), lambda m, _: isinstance(m, torch.nn.Linear))


def dequantized(w) -> torch.Tensor:
    """A torchao weight -> float32, from its documented formula (not through our decoding)."""
    if type(w).__name__ == "Int4Tensor":
        q = torch.stack([w.qdata << 4 >> 4, w.qdata >> 4], dim=-1).flatten(-2).float()  # low nibble first
        group = q.shape[1] // w.scale.shape[0]
        return q * w.scale.t().float().repeat_interleave(group, 1) + w.zero_point.t().float().repeat_interleave(
            group, 1
        )
    group = w.block_size[-1]
    return (w.qdata.float() - w.zero_point.float().repeat_interleave(group, 1)) * w.scale.float().repeat_interleave(
        group, 1
    )


def save(hf, directory: Path, serialization: str) -> dict[str, torch.Tensor]:
    """Write the quantized model as transformers does (config.json with the torchao quantization_config), pickled
    or as safetensors with torchao's metadata; returns the weights dequantized (checkpoint names)."""
    directory.mkdir()
    state = hf.state_dict()
    config = hf.config.to_dict() | {"quantization_config": {"quant_method": "torchao", "quant_type": {}}}
    (directory / "config.json").write_text(json.dumps(config))
    if serialization == "pickle":
        torch.save(state, directory / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        tensors, metadata = flatten_tensor_state_dict(state)
        save_file(tensors, directory / "model.safetensors", metadata=metadata)
    return {k: dequantized(v) if type(v) is not torch.Tensor else v.float() for k, v in state.items()}


@pytest.fixture(params=["hqq", "qat"])
def recipe(request):
    return request.param


def torchao_checkpoint(recipe: str, serialization: str, directory: Path, monkeypatch) -> dict[str, torch.Tensor]:
    hf = untied_model()
    hqq_int8_int4(hf) if recipe == "hqq" else qat_int4(hf, monkeypatch)
    return save(hf, directory, serialization)


def reference(dense: dict[str, torch.Tensor]):
    """transformers' Gemma3ForCausalLM on the dequantized weights, float32."""
    hf = hf_text_model(hidden_size=128, intermediate_size=256, head_dim=32, tie_word_embeddings=False)
    hf.load_state_dict(dense)
    return hf


WITHOUT_TORCHAO = """
import sys, torch
sys.modules["torchao"] = None  # importing torchao now fails
from gemma3_int4 import loader, quant
model = loader.from_pretrained(sys.argv[1], dtype=torch.float32)
assert "torchao" not in sys.modules or sys.modules["torchao"] is None
ids = torch.tensor([[2, 17, 99, 4, 250, 31, 7, 400]])
kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, quant.QuantLinear)}
zeros = sorted(name for name, m in model.named_modules() if getattr(m, "zeros", None) is not None)
embed = model.embed.dequantize()  # a dense embedding is quantized on load (weights="auto")
torch.save({"logits": model(ids), "kinds": kinds, "zeros": zeros, "embed": embed}, sys.argv[2])
"""


@pytest.mark.parametrize("serialization", ["pickle", "safetensors"])
def test_loads_exactly_without_torchao(recipe, serialization, tmp_path, monkeypatch):
    """Each weight lands in our int4 (or int8) exactly: HQQ's symmetric int4 without zeros and its int8 embedding
    per row; the QAT recipe's asymmetric groups of 128 as int4 with zeros over four groups of 32 each; the
    untied head quantized like any linear. Logits match transformers on the dequantized weights."""
    dense = torchao_checkpoint(recipe, serialization, tmp_path / "ckpt", monkeypatch)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCHAO, str(tmp_path / "ckpt"), str(tmp_path / "ours.pt")],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    ours = torch.load(tmp_path / "ours.pt")
    assert ours["kinds"]["lm_head"] == "Int4Linear"
    assert ours["kinds"]["layers.0.attn.qkv_proj"] == "Int4Linear"
    if recipe == "hqq":
        assert ours["kinds"]["embed"] == "Int8Linear" and ours["zeros"] == []  # HQQ's zero points are all 0
        assert torch.equal(ours["embed"], dense["model.embed_tokens.weight"])
    else:  # the embedding is no linear: bf16 in the file, and int4 (round to nearest) here as for any dense one
        assert ours["kinds"]["embed"] == "Int4Linear" and "lm_head" in ours["zeros"]
        dense["model.embed_tokens.weight"] = ours["embed"]
    ids = torch.tensor([[2, 17, 99, 4, 250, 31, 7, 400]])
    expected = reference(dense)(ids).logits
    assert (ours["logits"] - expected).abs().max() < 1e-3
    _, tensors, _ = load_checkpoint(tmp_path / "ckpt")  # here torchao is importable: the same exact weights
    decoded = 0
    for name, w in dense.items():
        module = our_name(name).removesuffix(".weight")
        if f"{module}.scales" in tensors:
            assert torch.equal(quant.dequantize(tensors, module), w), name
            decoded += 1
    assert decoded == 7 * 7 + 1 + (recipe == "hqq")  # every linear and the head (and HQQ's int8 embedding)


def test_greedy_output_matches_transformers(recipe, tmp_path, monkeypatch):
    from gemma3_int4.generation import Sampling, generate

    dense = torchao_checkpoint(recipe, "safetensors", tmp_path / "ckpt", monkeypatch)
    model = loader.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    bf16 = loader.from_pretrained(tmp_path / "ckpt")  # the untied embedding is only looked up: never packed
    assert bf16.lm_head.cpu_kernel == "int4" and bf16.embed.cpu_kernel is None and bf16.embed.cpu_packed is None
    prompt = [2, 17, 99, 4, 250, 31]
    ours = list(generate(model, prompt, 12, Sampling(temperature=0)))
    dense["model.embed_tokens.weight"] = model.embed.dequantize()  # as ours holds it (QAT's is quantized on load)
    hf = reference(dense)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :].tolist()
    assert ours == theirs[: len(ours)] and len(ours) >= 1


def test_a_hostile_pickle_is_refused(tmp_path):
    """A .bin whose pickle calls os.system is refused before anything runs, with the global it names."""
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "ckpt").mkdir()
    torch.save({"model.embed_tokens.weight": Hostile()}, tmp_path / "ckpt" / "pytorch_model.bin")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(hf_text_model().config.to_dict()))
    with pytest.raises(ValueError, match=r"refused: the pickle names (posix|os)\.system"):
        loader.from_pretrained(tmp_path / "ckpt")
    assert not marker.exists()
    torch.save({"w": torch.nn.Linear(2, 2)}, tmp_path / "ckpt" / "pytorch_model.bin")  # a module: another class
    with pytest.raises(ValueError, match="refused: the pickle names torch.nn.modules.linear.Linear"):
        loader.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("pickled", [b"R.", b".", b"ccollections\nOrderedDict\n(K\x01K\x02tR."])
def test_a_damaged_pickle_is_one_clear_error(pickled, tmp_path):
    """Opcodes on an empty stack, an allowed callable given bad arguments: one line naming the file."""
    good = tmp_path / "good.bin"
    torch.save({"w": torch.zeros(2)}, good)
    (tmp_path / "ckpt").mkdir()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path / "ckpt" / "pytorch_model.bin", "w") as dst:
        for item in src.infolist():
            dst.writestr(item, pickled if item.filename.endswith("data.pkl") else src.read(item))
    with pytest.raises(ValueError, match="pytorch_model.bin: (not a readable PyTorch checkpoint|refused)"):
        read_tensors(tmp_path / "ckpt", [tmp_path / "ckpt" / "pytorch_model.bin"])


@pytest.mark.parametrize(
    "metadata",
    [
        {"tensor_names": "5"},
        {"tensor_names": "not json"},
        {"tensor_names": '["a.weight"]', "a.weight": '{"_type": "Tensor"}'},  # listed, not stored
        {"tensor_names": '["w.weight"]', "w.weight": '{"_type": "Int4Tensor", "_data": [1]}'},
        {"tensor_names": '["w.weight"]', "w.weight": '{"_type": "Float8Tensor"}'},
        {"tensor_names": '["w.weight"]', "w.weight": '{"_type": "Int4Tensor", "_data": {"block_size": []}}'},
    ],
)
def test_bad_torchao_metadata_is_one_clear_error(metadata, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "ckpt").mkdir()
    tensors = {"w._weight_qdata": torch.zeros(4, 16, dtype=torch.int8), "w._weight_scale": torch.ones(1, 4),
               "w._weight_zero_point": torch.zeros(1, 4)}  # fmt: skip
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="model.safetensors|ckpt"):
        read_tensors(tmp_path / "ckpt", [tmp_path / "ckpt" / "model.safetensors"])


def float_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every 2-D weight of a state dict (our names) as float32, by module."""
    modules = {k.rpartition(".")[0] for k in tensors if k.endswith(("int4_data", "int8_data", ".weight"))}
    out = {}
    for m in modules:
        w = tensors[f"{m}.weight"].float() if f"{m}.weight" in tensors else quant.dequantize(tensors, m)
        if w.dim() == 2:
            out[m] = w
    return out


@pytest.mark.parametrize("to", ["int4", "gguf", "awq", "compressed-tensors", "dense"])
def test_converts_to_every_format(recipe, to, tmp_path, tokenizer_file, monkeypatch):
    """convert.py from a torchao checkpoint to each output, read back: our int4 holds the very tensors; the others
    every weight up to what they store (bf16 for dense weights and the engines' dense embedding and head, fp16
    GGUF scales). AWQ and compressed-tensors hold integer zero points only, so the QAT recipe's float zeros are
    refitted there, with a warning (within two steps of a symmetric grid: the refit narrows a group's range where
    that lowers its squared error, moving an outlier further)."""
    torchao_checkpoint(recipe, "pickle", tmp_path / "ckpt", monkeypatch)
    dst = tmp_path / ("out.gguf" if to == "gguf" else "out")
    requantized = recipe == "qat" and to in ("awq", "compressed-tensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert.convert(str(tmp_path / "ckpt"), dst, to, tokenizer=tokenizer_file)
    assert any("refitted with integer zero points" in str(w.message) for w in caught) == requantized
    policy = "dense" if to == "dense" else "auto"  # as convert.py's
    integer = to in ("awq", "compressed-tensors")
    source = loader.convert_weights(load_checkpoint(tmp_path / "ckpt")[1], policy, set(), False, integer)
    config, back, _ = load_checkpoint(dst)
    assert not config.tie_word_embeddings and "lm_head" in float_weights(back)  # still untied
    if to == "int4":
        assert source.keys() == back.keys() and all(torch.equal(source[k], back[k]) for k in source)
    theirs = float_weights(back)
    for module, w in float_weights(source).items():
        step = w.abs().amax() / 3.5 if requantized and module not in ("embed", "lm_head") else w.abs().amax() / 128
        assert (theirs[module] - w).abs().max() <= step, module
    model = loader.from_pretrained(dst, dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[2, 17, 99, 4]]))).all()


def test_a_quantized_vision_tower_is_dequantized():
    """torchao's recipes quantize every linear, the vision tower's too: the tower keeps float weights here."""
    data, scales = quant.quantize_int4(torch.randn(48, 64))
    fc1 = "vision.layers.0.mlp.fc1"
    tensors = {f"{fc1}.int4_data": data, f"{fc1}.scales": scales, f"{fc1}.bias": torch.zeros(48),
               "layers.0.mlp.down_proj.weight": torch.randn(64, 96)}  # fmt: skip
    out = loader.convert_weights(tensors, "auto", set())
    assert torch.equal(out[f"{fc1}.weight"], quant.dequantize_int4(data, scales.float()))
    assert "layers.0.mlp.down_proj.int4_data" in out and f"{fc1}.bias" in out


def stand_in(kind: str, **attributes) -> torch.Tensor:
    from gemma3_int4.formats import torchao as torchao_format

    weight = torch.Tensor._make_wrapper_subclass(torchao_format.CLASSES[kind], attributes["qdata"].shape)
    weight.__dict__.update(attributes)
    return weight


def test_weights_our_formats_cannot_hold_exactly_come_in_dense():
    """A partial last group (K = 80 in groups of 32) or zero points on a per-row int8 weight: dense, the formula's."""
    from gemma3_int4.formats import torchao as torchao_format

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (16, 80), generator=g, dtype=torch.int8)
    scale, zp = torch.rand(16, 3, generator=g).to(torch.bfloat16), torch.randint(-2, 3, (16, 3), generator=g)
    w = stand_in("IntxUnpackedToInt8Tensor", qdata=q, scale=scale, zero_point=zp.to(torch.int8), block_size=(1, 32),
                 target_dtype=torch.int4)  # fmt: skip
    columns = torch.arange(80) // 32
    expected = (q.float() - zp.float()[:, columns]) * scale.float()[:, columns]
    assert torch.equal(torchao_format.decode_weight(w)["weight"], expected)
    q8 = torch.randint(-128, 128, (16, 64), generator=g, dtype=torch.int8)
    no_zero = torch.zeros(16, 1, dtype=torch.int8)
    row = stand_in("IntxUnpackedToInt8Tensor", qdata=q8, scale=scale[:, :1], zero_point=no_zero, block_size=(1, 64),
                   target_dtype=torch.int8)  # fmt: skip
    assert set(torchao_format.decode_weight(row)) == {"int8_data", "scales"}
    row.zero_point = torch.ones(16, 1, dtype=torch.int8)
    assert torch.equal(torchao_format.decode_weight(row)["weight"], (q8.float() - 1) * scale[:, :1].float())


def test_a_multimodal_checkpoint_with_its_vision_tower_quantized(tmp_path):
    """The 4B card quantizes the multimodal model: model.language_model.*, an untied lm_head, and the vision
    tower's linears too (those whose K takes groups of 32). It loads with the tower dequantized (float, as the
    tower always is here) and matches transformers on the same weights, an image in the prompt."""
    from conftest import hf_multimodal_model
    from test_vision import hf_logits, image_prompt
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_

    from gemma3_int4.config import TEXT_VOCAB_SIZE

    def untied():
        hf = hf_multimodal_model()
        hf.config.tie_word_embeddings = hf.config.text_config.tie_word_embeddings = False
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * 0.1)
        return hf

    hf = untied().to(torch.bfloat16)
    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(32), intx_choose_qparams_algorithm="hqq_scale_only"
    )
    quantize_(hf, config, lambda m, _: isinstance(m, torch.nn.Linear) and m.in_features % 32 == 0)
    assert any("vision" in k and type(v) is not torch.Tensor for k, v in hf.state_dict().items())
    dense = save(hf, tmp_path / "ckpt", "pickle")
    ours = loader.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert isinstance(ours.lm_head, quant.Int4Linear) and ours.vision is not None
    assert not any(isinstance(m, quant.QuantLinear) for m in ours.vision.modules())
    reference = untied()
    dense["model.language_model.embed_tokens.weight"] = ours.embed.dequantize()  # bf16 in the file: int4 on load
    reference.load_state_dict(dense)
    ids = image_prompt([[2, 17, 99], [4, 250, 31]], tokens_per_image=4)
    pixels = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = hf_logits(reference, ids, pixels)
    with torch.no_grad():
        got = ours(torch.tensor([ids]), pixel_values=pixels)[..., :TEXT_VOCAB_SIZE]
    assert (got - expected).abs().max() < 1e-3
