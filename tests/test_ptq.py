"""GPTQ (ptq.py) on tiny random models: quant.py's int4 format, lower error than round to nearest, QAT grids kept."""

import pydoc_data.topics

import pytest
import torch
from conftest import TINY, hf_text_model, randomize

import convert
from gemma3_int4 import loader, ptq, quant
from gemma3_int4.config import BOS_ID, Gemma3Config
from gemma3_int4.formats.hf import our_name
from gemma3_int4.loader import FUSED, split_projections
from gemma3_int4.model import Gemma3

CONFIG = Gemma3Config(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=96,
                      sliding_window=8, vocab_size=512, query_pre_attn_scalar=24)  # fmt: skip


@pytest.fixture(scope="module")
def dense() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Gemma3(CONFIG)
    randomize(model)
    return split_projections({k: v.detach().clone() for k, v in model.state_dict().items()}, CONFIG)


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (32, 64), generator=torch.Generator().manual_seed(1))


def model_from(tensors: dict[str, torch.Tensor]) -> Gemma3:
    return loader.from_tensors(CONFIG, tensors, torch.float32)


def weight_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k.removesuffix(".weight") for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2]


def stacked_module(name: str) -> str:
    """The model's module that computes checkpoint weight `name` (q/k/v and gate/up are stacked in one)."""
    for fused, parts in FUSED.items():
        for part in parts:
            name = name.replace(part, fused)
    return name


def test_output_is_the_int4_format_and_the_rest_passes_through(dense, calibration):
    vision = {"vision.patch_embedding.weight": torch.randn(8, 3, 7, 7), "projector.w.weight": torch.randn(8, 64)}
    tensors = {**dense, **vision}
    before = {k: v.clone() for k, v in tensors.items()}
    out = ptq.gptq(CONFIG, tensors, calibration[:4, :16])
    linears = weight_names(dense)
    assert "embed" in linears and len(linears) == 1 + 7 * CONFIG.num_layers
    expected = {k for k in tensors if k.removesuffix(".weight") not in linears}
    expected |= {f"{n}.{kind}" for n in linears for kind in ("int4_data", "scales")}
    assert set(out) == expected
    for n in linears:
        N, K = dense[f"{n}.weight"].shape
        assert out[f"{n}.int4_data"].dtype == torch.int8 and out[f"{n}.int4_data"].shape == (N, K // 2)
        assert out[f"{n}.scales"].dtype == torch.bfloat16 and out[f"{n}.scales"].shape == (N, K // quant.GROUP_SIZE)
    for k in expected & tensors.keys():
        assert out[k] is tensors[k]  # norms and the vision tower untouched
    assert all(torch.equal(before[k], tensors[k]) for k in tensors)  # and the input state dict unchanged


def test_lower_layer_output_error_than_round_to_nearest(dense, calibration):
    """|| X W^T - X Wq^T || on the calibration activations X (the dense model's: sequential=False), for every
    linear and the head. The margin fails if GPTQ degenerates to round to nearest."""
    model, inputs = model_from(dense), {}
    hooks = [m.register_forward_hook(lambda m, x, y, n=n: inputs.__setitem__(n, x[0].reshape(-1, x[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]  # fmt: skip
    with torch.no_grad():
        inputs["embed"] = model.hidden_states(model.embed_tokens(calibration)).reshape(-1, CONFIG.hidden_size)
    for h in hooks:
        h.remove()
    out = ptq.gptq(CONFIG, dense, calibration, sequential=False)
    for n in weight_names(dense):
        w, x = dense[f"{n}.weight"], inputs[stacked_module(n)]
        rtn = quant.dequantize_int4(*quant.quantize_int4(w))
        ours = quant.dequantize_int4(out[f"{n}.int4_data"], out[f"{n}.scales"])
        err_rtn, err_ours = (x @ (w - rtn.float()).T).norm(), (x @ (w - ours.float()).T).norm()
        assert err_ours < 0.9 * err_rtn, n


def test_logits_closer_to_dense_than_round_to_nearest(dense, calibration):
    reference = model_from(dense)
    rtn, ours = model_from(quant.convert_state_dict(dense, "int4")), model_from(ptq.gptq(CONFIG, dense, calibration))
    with torch.no_grad():
        expected = reference(calibration)
        err_rtn, err_ours = (rtn(calibration) - expected).norm(), (ours(calibration) - expected).norm()
    assert err_ours < 0.95 * err_rtn


def test_weights_on_an_int4_grid_are_kept_exactly(dense, calibration):
    """QAT-like weights (every 2-D weight dequantized int4, and half the rows of one on the grid) come out as
    quantize_int4 gives them: the same digits and scales, lossless."""
    tensors = dict(dense)
    for n in weight_names(dense):
        tensors[f"{n}.weight"] = quant.dequantize_int4(*quant.quantize_int4(dense[f"{n}.weight"])).float()
    mixed = dense["layers.1.mlp.up_proj.weight"].clone()
    mixed[::2] = tensors["layers.1.mlp.up_proj.weight"][::2]
    tensors["layers.1.mlp.up_proj.weight"] = mixed
    out = ptq.gptq(CONFIG, tensors, calibration[:8])
    for n in weight_names(dense):
        data, scales = quant.quantize_int4(tensors[f"{n}.weight"])
        rows = slice(None, None, 2) if n == "layers.1.mlp.up_proj" else slice(None)
        assert torch.equal(out[f"{n}.int4_data"][rows], data[rows]), n
        assert torch.equal(out[f"{n}.scales"][rows], scales[rows]), n
    assert not torch.equal(out["layers.1.mlp.up_proj.int4_data"][1::2], data[1::2])  # the other rows are GPTQ's


def test_dead_inputs_and_zero_groups():
    """An input that is always zero makes X^T X singular; an all-zero group has no scale of its own."""
    w = torch.randn(16, 64)
    w[:3, 32:] = 0.0
    x = torch.randn(256, 64)
    x[:, 5] = 0.0
    data, scales = ptq.gptq_quantize(w, x.T @ x)
    assert torch.isfinite(scales.float()).all()
    assert (scales[:3, 1] == 1).all() and (quant.unpack_int4(data)[:3, 32:] == 0).all()


def test_rejects_quantized_weights(dense, calibration):
    with pytest.raises(ValueError, match="dense weights"):
        ptq.gptq(CONFIG, quant.convert_state_dict(dense, "int4"), calibration)


def test_calibration_text():
    text = ptq.calibration_text()
    assert text == ptq.calibration_text() and len(text) > 200_000
    evaluation = "\n\n".join(pydoc_data.topics.topics.values())
    assert not any(evaluation[i : i + 300] in text for i in range(0, 100_000, 10_000))


def test_calibration_ids(tokenizer_file):
    from gemma3_int4.tokenizer import Tokenizer

    ids = ptq.calibration_ids(Tokenizer.from_file(tokenizer_file), num_seqs=4, seq_len=32)
    assert ids.shape == (4, 32) and (ids[:, 0] == BOS_ID).all() and (ids[:, 1:] != BOS_ID).all()
    assert len({tuple(r) for r in ids.tolist()}) == 4


def test_convert_py_gptq(tmp_path, tokenizer_file):
    """convert.py --quantizer gptq: a dense HF checkpoint in, our int4 out, calibrated on a text file, and closer
    to the dense model than symmetric round to nearest (--quantizer rtn --weights int4) on the same grid."""
    hf = hf_text_model()
    hf.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join(list(pydoc_data.topics.topics.values())[-60:]))
    for quantizer in ("rtn", "gptq"):
        convert.convert(str(tmp_path / "dense"), tmp_path / quantizer, "int4", "int4", None, quantizer, text)
    ids = torch.randint(0, TINY["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(ids).logits
        err = {q: (loader.from_pretrained(tmp_path / q, torch.float32)(ids) - expected).norm() for q in ("rtn", "gptq")}
    assert isinstance(loader.from_pretrained(tmp_path / "gptq").embed, quant.Int4Linear)
    assert err["gptq"] < 0.95 * err["rtn"]
    with pytest.raises(ValueError, match="gptq only for a quantized target"):
        convert.convert(str(tmp_path / "dense"), tmp_path / "x", "dense", quantizer="gptq")


def test_input_mean_squares_match_transformers(tmp_path):
    """Each linear's inputs' mean square per column (the refit's column weights) over the calibration tokens: as
    forward hooks on transformers' model with the same weights see them, q/k/v and gate/up each their own."""

    hf = hf_text_model()
    hf.save_pretrained(tmp_path)
    config, tensors, _ = loader.load_checkpoint(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = BOS_ID
    got = ptq.input_mean_squares(config, tensors, ids, batch_size=2)
    expected, handles = {}, []
    for name, linear in hf.model.layers.named_modules():
        if isinstance(linear, torch.nn.Linear):
            hook = lambda m, inputs, out, name=name: expected.__setitem__(name, inputs[0].square().mean((0, 1)))
            handles.append(linear.register_forward_hook(hook))
    with torch.no_grad():
        hf(ids)
    assert len(expected) == len(got) == 7 * TINY["num_hidden_layers"]
    for name, mean_square in expected.items():
        ours = got[our_name(f"model.layers.{name}.weight").removesuffix(".weight")]
        torch.testing.assert_close(ours, mean_square, rtol=1e-4, atol=1e-6)
