"""Google's Flax/Orbax checkpoints (formats/orbax.py): tiny Gemma 3 models whose weights lie on an int4 grid, as the
QAT checkpoints' do, written with orbax in Google's tree layout, read back, quantized bit for bit, and run against
transformers holding the same weights."""

import sys

import numpy as np
import pytest
import torch
from conftest import TINY, VISION_TINY, randomize, run_main

import convert
from gemma3_int4 import loader, quant
from gemma3_int4.config import CONFIGS, IMAGE_TOKEN_ID, TEXT_VOCAB_SIZE, VISION_MODULES, Gemma3Config
from gemma3_int4.formats import orbax
from gemma3_int4.formats.config_json import from_hf
from gemma3_int4.formats.hf import our_name
from gemma3_int4.loader import convert_weights, load_checkpoint

ocp = pytest.importorskip("orbax.checkpoint")
bfloat16 = pytest.importorskip("ml_dtypes").bfloat16

SIGLIP = "SigLiPFromPatches_0/siglip_encoder"
# A tiny Orbax checkpoint has no config: formats/orbax.py takes the shapes' and Gemma 3's defaults for the rest (1B's
# for text-only models, 4B's for multimodal ones, query_pre_attn_scalar = head_dim). The references agree.
TEXT = {**TINY, "query_pre_attn_scalar": 32, "sliding_window": 512, "rope_scaling": None,
        "max_position_embeddings": 32768}  # fmt: skip
MULTIMODAL_TEXT = {**TINY, "vocab_size": 262208, "query_pre_attn_scalar": 32, "sliding_window": 1024,
                   "max_position_embeddings": 131072}  # fmt: skip
VISION = {**VISION_TINY, "image_size": 56}  # an 8x8 patch grid, pooled 4x4 to 2x2 = 4 soft tokens per image


def grid_weight(rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """q (rows, cols) and s (rows, cols/32) of a QAT-like weight w = q * s: q in -7..7, each group of 32 with a
    largest |q| of 7 (most groups) or 2..6, and a +-1 beside it, so that gcd(q) = 1 and s is the one grid that fits.
    s has 5 significant bits, so every q * s is exact in bf16 too."""
    groups = cols // 32
    randint = lambda low, high: torch.randint(low, high, (rows, groups), generator=gen)
    m = torch.where(torch.rand(rows, groups, generator=gen) < 0.7, 7, randint(2, 7))  # the largest |q|
    q = torch.round((torch.rand(rows, groups, 32, generator=gen) * 2 - 1) * m[..., None])
    q[..., 0], q[..., 1] = m * (randint(0, 2) * 2 - 1), randint(0, 2) * 2 - 1
    s = randint(16, 32) * 2.0 ** randint(-11, -9)
    return q.flatten(-2).to(torch.int8), s.to(torch.bfloat16)


def reference(multimodal: bool):
    """A random transformers Gemma 3 in float32 whose language model's linear weights and (text-only) embedding lie
    on an int4 grid and whose other weights are bf16 values; and the grids, {our name: (q, s)}."""
    import transformers

    torch.manual_seed(0)
    if multimodal:
        config = transformers.Gemma3Config(text_config=MULTIMODAL_TEXT, vision_config=VISION, mm_tokens_per_image=4,
                                           attn_implementation="eager")  # fmt: skip
        hf = transformers.Gemma3ForConditionalGeneration(config)
    else:
        hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**TEXT, attn_implementation="eager"))
    hf = hf.float().eval()
    randomize(hf)
    grids, gen = {}, torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, w in hf.state_dict().items():
            ours = our_name(name)
            if ours.startswith("lm_head."):  # the tied head: the embedding itself
                continue
            if ours == "embed.weight":
                w[TEXT_VOCAB_SIZE:] = 0  # the multimodal embedding's padding: Google stores 262144 rows
            # the multimodal embedding stays dense: the grid search over its 16.7M weights takes seconds
            if w.dim() == 2 and not ours.startswith(VISION_MODULES) and not (multimodal and ours == "embed.weight"):
                q, s = grid_weight(*w.shape, gen)
                grids[ours] = q, s
                w.copy_(quant.dequantize_int4(quant.pack_int4(q), s.float()))
            else:
                w.copy_(w.bfloat16().float())
    return hf, grids


def google_tree(hf) -> dict[str, dict[str, np.ndarray]]:
    """The model's weights in Google's Orbax layout (module path -> {param: array})."""
    t = {our_name(k): v.numpy() for k, v in hf.state_dict().items() if not our_name(k).startswith("lm_head.")}
    D, hd = t["norm.weight"].shape[0], t["layers.0.attn.q_norm.weight"].shape[0]
    heads = lambda w: w.reshape(-1, hd, D).transpose(0, 2, 1)  # (H * hd, D) -> (H, D, hd)
    tree = {
        "transformer/embedder": {"input_embedding": t["embed.weight"][:TEXT_VOCAB_SIZE]},
        "transformer/final_norm": {"scale": t["norm.weight"]},
    }
    i = 0
    while f"layers.{i}.input_norm.weight" in t:
        g, L = f"transformer/layer_{i}/", lambda k: t[f"layers.{i}.{k}"]  # noqa: B023
        tree |= {
            g + "pre_attention_norm": {"scale": L("input_norm.weight")},
            g + "post_attention_norm": {"scale": L("post_attn_norm.weight")},
            g + "pre_ffw_norm": {"scale": L("pre_ffw_norm.weight")},
            g + "post_ffw_norm": {"scale": L("post_ffw_norm.weight")},
            g + "attn/_query_norm": {"scale": L("attn.q_norm.weight")},
            g + "attn/_key_norm": {"scale": L("attn.k_norm.weight")},
            g + "attn/q_einsum": {"w": heads(L("attn.q_proj.weight"))},
            g + "attn/kv_einsum": {"w": np.stack([heads(L("attn.k_proj.weight")), heads(L("attn.v_proj.weight"))])},
            g + "attn/attn_vec_einsum": {"w": L("attn.o_proj.weight").T.reshape(-1, hd, D)},
            g + "mlp/gating_einsum": {"w": np.stack([L("mlp.gate_proj.weight"), L("mlp.up_proj.weight")])},
            g + "mlp/linear": {"w": L("mlp.down_proj.weight").T},
        }
        i += 1
    if "vision.post_layernorm.weight" in t:
        tree |= vision_tree(t)
    return tree


def vision_tree(t: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    V = lambda k: t[f"vision.{k}"]
    C, heads = V("post_layernorm.weight").shape[0], VISION["num_attention_heads"]
    tree = {
        "transformer/embedder/mm_input_projection": {"w": t["projector.mm_input_projection_weight"]},
        "transformer/embedder/mm_soft_embedding_norm": {"scale": t["projector.mm_soft_emb_norm.weight"]},
        SIGLIP: {"pos_embedding": V("position_embedding.weight")[None]},
        f"{SIGLIP}/embedding": {
            "kernel": V("patch_embedding.weight").transpose(2, 3, 1, 0),  # (out, in, h, w): HWIO
            "bias": V("patch_embedding.bias"),
        },
        f"{SIGLIP}/Transformer/encoder_norm": {"scale": V("post_layernorm.weight"), "bias": V("post_layernorm.bias")},
    }
    for j in range(VISION["num_hidden_layers"]):
        g, L = f"{SIGLIP}/Transformer/encoderblock_{j}/", lambda k: V(f"layers.{j}.{k}")  # noqa: B023
        attn = g + "MultiHeadDotProductAttention_0/"
        tree |= {
            g + "LayerNorm_0": {"scale": L("layer_norm1.weight"), "bias": L("layer_norm1.bias")},
            g + "LayerNorm_1": {"scale": L("layer_norm2.weight"), "bias": L("layer_norm2.bias")},
            attn + "out": {
                "kernel": L("self_attn.out_proj.weight").T.reshape(heads, -1, C),
                "bias": L("self_attn.out_proj.bias"),
            },
            g + "MlpBlock_0/Dense_0": {"kernel": L("mlp.fc1.weight").T, "bias": L("mlp.fc1.bias")},
            g + "MlpBlock_0/Dense_1": {"kernel": L("mlp.fc2.weight").T, "bias": L("mlp.fc2.bias")},
        }
        for ours, theirs in ("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"):
            tree[attn + theirs] = {"kernel": L(f"self_attn.{ours}.weight").T.reshape(C, heads, -1),
                                   "bias": L(f"self_attn.{ours}.bias").reshape(heads, -1)}  # fmt: skip
    return tree


def write_orbax(tree: dict, directory, dtype=np.float32):
    tree = {
        module: {k: np.ascontiguousarray(a).astype(dtype) for k, a in params.items()} for module, params in tree.items()
    }
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory.absolute(), tree)
    return directory


CASES = {"text": (False, np.float32), "text, bf16 arrays": (False, bfloat16), "multimodal": (True, np.float32)}


@pytest.fixture(scope="module", params=list(CASES))
def loaded(request, tmp_path_factory):
    """(transformers reference, its int4 grids, what orbax.read returns for its Orbax checkpoint)."""
    multimodal, dtype = CASES[request.param]
    hf, grids = reference(multimodal)
    directory = write_orbax(google_tree(hf), tmp_path_factory.mktemp("orbax") / "ckpt", dtype)
    return hf, grids, orbax.read(directory)


def int4(tensors: dict[str, torch.Tensor], grids: dict) -> dict[str, torch.Tensor]:
    """weights="auto" (int4), but for the weights reference() left dense (the multimodal embedding)."""
    dense = {k: v for k, v in tensors.items() if k == "embed.weight" and k not in grids}
    return convert_weights({k: v for k, v in tensors.items() if k not in dense}, "auto", set()) | dense


def test_qat_grid_is_recovered_bit_exactly(loaded):
    hf, grids, (_, tensors, above_4_bits) = loaded
    assert above_4_bits == set()
    assert all(t.dtype == torch.float32 for t in tensors.values())
    converted = int4(tensors, grids)
    for name, (q, s) in grids.items():
        module = name.removesuffix(".weight")
        assert torch.equal(converted[f"{module}.int4_data"], quant.pack_int4(q)), name
        assert torch.equal(converted[f"{module}.scales"], s), name
    for name, w in hf.state_dict().items():  # norms, the vision tower, the projector, the padded embedding
        if not our_name(name).startswith("lm_head.") and our_name(name) not in grids:
            assert torch.equal(tensors[our_name(name)], w), name


def test_config_is_inferred_from_the_shapes(loaded):
    hf, _, (hf_config, _, _) = loaded
    assert from_hf(hf_config) == from_hf(hf.config.to_dict())


def test_logits_match_transformers(loaded):
    hf, grids, (hf_config, tensors, _) = loaded
    ours = loader.from_tensors(from_hf(hf_config), int4(tensors, grids), torch.float32)
    g = torch.Generator().manual_seed(2)
    words = lambda n: torch.randint(0, 500, (n,), generator=g).tolist()
    if ours.vision is None:
        ids, kwargs, ours_kwargs = torch.tensor([[2, *words(15)]]), {}, {}
    else:  # text, <start_of_image>, 4 soft tokens, <end_of_image>, text
        ids = torch.tensor([[2, *words(5), 255999, *[IMAGE_TOKEN_ID] * 4, 256000, *words(6)]])
        pixels = torch.rand(1, 3, 56, 56, generator=g) * 2 - 1
        kwargs = dict(pixel_values=pixels, token_type_ids=(ids == IMAGE_TOKEN_ID).long())
        ours_kwargs = dict(pixel_values=pixels)
    with torch.no_grad():
        expected = hf(input_ids=ids, **kwargs).logits[..., :TEXT_VOCAB_SIZE]
        got = ours(ids, **ours_kwargs)[..., :TEXT_VOCAB_SIZE]
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("size", list(CONFIGS))
def test_published_sizes_are_recognised(size):
    config = Gemma3Config.from_name(size)
    shapes = {key: shape for key, shape, _ in orbax.layout(config).values()}
    assert orbax.config_from_shapes(shapes) == config
    if size == "4b":  # Google's shapes, as published
        assert shapes["transformer/embedder/input_embedding"] == (262144, 2560)
        assert shapes["transformer/layer_0/attn/q_einsum/w"] == (8, 2560, 256)
        assert shapes["transformer/layer_0/attn/kv_einsum/w"] == (2, 4, 2560, 256)
        assert shapes["transformer/layer_0/mlp/gating_einsum/w"] == (2, 10240, 2560)
        assert shapes[f"{SIGLIP}/pos_embedding"] == (1, 4096, 1152)
        assert shapes[f"{SIGLIP}/embedding/kernel"] == (14, 14, 3, 1152)


def test_what_is_an_orbax_checkpoint(tmp_path):
    directory = write_orbax({"transformer/final_norm": {"scale": np.zeros(4)}}, tmp_path / "ckpt")
    hf_directory = tmp_path / "hf"
    hf_directory.mkdir()
    (hf_directory / "config.json").write_text("{}")
    assert orbax.is_orbax(directory)
    assert not orbax.is_orbax(hf_directory) and not orbax.is_orbax(tmp_path / "missing")
    assert not orbax.is_orbax(directory / "_CHECKPOINT_METADATA")  # a file
    with pytest.raises(ValueError, match="not a readable Orbax checkpoint"):
        orbax.read(hf_directory)


def test_trees_that_are_not_gemma_3(tmp_path):
    write_orbax({"params": {"w": np.ones((4, 4))}}, tmp_path / "other")
    with pytest.raises(ValueError, match="not of Gemma 3: it has no transformer/embedder/input_embedding"):
        orbax.read(tmp_path / "other")
    hf, _ = reference(multimodal=False)
    tree = google_tree(hf)
    del tree["transformer/layer_3/post_ffw_norm"]
    with pytest.raises(ValueError, match="has no transformer/layer_3/post_ffw_norm/scale"):
        orbax.read(write_orbax(tree, tmp_path / "missing"))
    tree = google_tree(hf)
    tree["transformer/layer_2/mlp/linear"]["w"] = tree["transformer/layer_2/mlp/linear"]["w"].T
    with pytest.raises(ValueError, match=r"layer_2/mlp/linear/w has shape \(64, 96\), expected \(96, 64\)"):
        orbax.read(write_orbax(tree, tmp_path / "transposed"))


def test_without_orbax(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ImportError, match=r"needs orbax-checkpoint: pip install \.\[flax\]"):
        orbax.read(tmp_path)


def test_convert_py_writes_the_qat_checkpoint_losslessly(tmp_path, tokenizer_file):
    """convert.py detects the Orbax directory, takes the tokenizer.model Google ships beside it, and writes our
    int4 checkpoint with every QAT group's q and scale exactly."""
    hf, grids = reference(multimodal=False)
    write_orbax(google_tree(hf), tmp_path / "ckpt")
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    out = run_main(convert, tmp_path / "ckpt", tmp_path / "int4", "--to", "int4")
    assert out.returncode == 0, out.stderr
    _, tensors, _ = load_checkpoint(tmp_path / "int4")
    for name, (q, s) in grids.items():
        module = name.removesuffix(".weight")
        assert torch.equal(tensors[f"{module}.int4_data"], quant.pack_int4(q)), name
        assert torch.equal(tensors[f"{module}.scales"], s), name
    assert (tmp_path / "int4" / "tokenizer.model").read_bytes() == tokenizer_file.read_bytes()
