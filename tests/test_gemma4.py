"""Gemma 4 (gemma4.py): parity with transformers' Gemma4ForCausalLM on tiny random configs of each kind (E-style:
per-layer embeddings, KV sharing, double-wide MLP; 31B-style: k_eq_v, wide full-layer heads, proportional RoPE;
26B-style: mixture of experts), through a plain forward, the KV caches and greedy generation; and its loaders."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import loader
import quant
from config import GEMMA4_CONFIGS, Gemma4Config
from gemma4 import Gemma4
from generation import Sampling, generate, prefill

TOL = 1e-3
S, F = "sliding_attention", "full_attention"
# 7 layers, full attention at 2 and 6 (the last), a window of 8 tokens, GQA 4/2; full layers' heads twice as wide
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=8, layer_types=[S, S, F, S, S, S, F],
    max_position_embeddings=256, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
)  # fmt: skip
KINDS = {
    # E2B/E4B: the last 3 layers read layer 3's (sliding) and 2's (full) keys and values; per-layer embeddings
    "e-style": dict(
        num_kv_shared_layers=3, hidden_size_per_layer_input=32, vocab_size_per_layer_input=512, use_double_wide_mlp=True
    ),  # fmt: skip
    # 31B: full layers' K and V from one projection, with their own kv heads
    "31b-style": dict(attention_k_eq_v=True, num_global_key_value_heads=1),
    # 26B-A4B: 8 experts, top 2, beside the dense MLP
    "moe": dict(
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=32,
    ),  # fmt: skip
}


def hf_gemma4(kind: str, seed: int = 0, **overrides):
    """A random transformers Gemma4ForCausalLM in float32: norms around 1 (Gemma 4 scales by w), every weight,
    router scale and layer scalar random."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(seed)
    config = Gemma4TextConfig(**{**TINY, **KINDS[kind], **overrides}, attn_implementation="eager")
    model = Gemma4ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.3) if "norm" in name or "scale" in name else p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    return model


def ours_from(hf, directory, weights: str = "dense") -> Gemma4:
    hf.save_pretrained(directory)
    return loader.from_pretrained(directory, dtype=torch.float32, weights=weights)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(tmp_path, kind):
    hf = hf_gemma4(kind)
    ours = ours_from(hf, tmp_path)
    assert isinstance(ours, Gemma4)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40))  # 40 tokens: 5x the sliding window
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= TOL
    assert got.abs().max().item() <= 30.0  # soft-capped


def test_each_feature_matters(tmp_path):
    """The parity above can fail: our model with one feature switched off no longer matches."""
    hf = hf_gemma4("e-style")
    ours = ours_from(hf, tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (1, 24))
    with torch.no_grad():
        expected = hf(ids).logits
        ours.layers[4].attn.shares_kv = False  # the shared layer attends over its own (absent) keys: an error
        with pytest.raises(TypeError):
            ours(ids)
        ours.layers[4].attn.shares_kv = True
        ours.config.partial_rotary_factor = 1.0  # full RoPE on the full layers
        assert (ours(ids) - expected).abs().max().item() > 1e-2
        ours.config.partial_rotary_factor = 0.25
        ours.layers[1].layer_scalar.fill_(1.0)
        assert (ours(ids) - expected).abs().max().item() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt_len, chunk", [(3, 3), (29, 5), (29, 12)])
def test_cached_decoding_matches_transformers(tmp_path, kind, prompt_len, chunk):
    """Prefill in chunks (shorter and longer than the window of 8), then one token at a time far past the
    window: every step's logits are transformers' full forward's; only the unshared layers own a cache."""
    hf = hf_gemma4(kind)
    ours = ours_from(hf, tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 44))
    with torch.no_grad():
        full = hf(ids).logits
        ours.setup_cache(batch_size=2, max_seq_len=64)
        steps = [ours(ids[:, t : min(t + chunk, prompt_len)], torch.arange(t, min(t + chunk, prompt_len)))
                 for t in range(0, prompt_len, chunk)]  # fmt: skip
        steps += [ours(ids[:, t : t + 1], torch.tensor([t])) for t in range(prompt_len, ids.shape[1])]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= TOL
    owners = [layer.attn.kv_cache is not None for layer in ours.layers]
    assert owners == [i < ours.config.first_shared_layer for i in range(len(ours.layers))]
    assert all(layer.attn.kv_cache.k.shape[2] == 8 for layer in ours.layers if owners and not layer.is_global
               and layer.attn.kv_cache is not None)  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_rows_at_their_own_positions(tmp_path, kind):
    """Two cache rows prefilled to different lengths (3 and 20), then decoded together, each at its own
    position: each row's logits are its own full forward's."""
    ours = ours_from(hf_gemma4(kind), tmp_path)
    seqs = torch.randint(0, TINY["vocab_size"], (2, 40))
    with torch.no_grad():
        full = ours(seqs)
        ours.setup_cache(batch_size=2, max_seq_len=64)
        lengths = [3, 20]
        for row, n in enumerate(lengths):
            prefill(ours, seqs[row : row + 1, :n], rows=slice(row, row + 1))
        for step in range(16):
            pos = torch.tensor([[n + step] for n in lengths])
            logits = ours(seqs.gather(1, pos), pos)
            for row in range(2):
                assert (logits[row, 0] - full[row, pos[row, 0]]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_continuation_is_transformers(tmp_path, kind):
    hf = hf_gemma4(kind)
    ours = ours_from(hf, tmp_path)
    prompt = torch.randint(0, TINY["vocab_size"], (1, 6))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, 6:].tolist()
    got = list(generate(ours, prompt[0].tolist(), 24, Sampling(temperature=0.0)))
    assert got == expected


def dequantized(ours: Gemma4) -> dict[str, torch.Tensor]:
    """Our model's weights as float tensors in transformers' names (for the reference)."""
    from model import split_projections

    stored = split_projections(ours.state_dict(), ours.config)
    modules = {name.rpartition(".")[0] for name in stored if name.rpartition(".")[2] in quant.FORMATS}
    dense = {k: v for k, v in stored.items() if k.rpartition(".")[2] not in quant.QUANT_PARTS}
    dense |= {f"{m}.weight": quant.dequantize(stored, m) for m in modules}
    return {checkpoint.hf_name(k): v for k, v in checkpoint.stack_experts(dense, torch.float32).items()}


@pytest.mark.parametrize("kind", KINDS)
def test_int4_matches_transformers_on_the_same_weights(tmp_path, kind):
    """weights="auto": every linear int4 (the per-layer embeddings int8, the router float); transformers on the
    dequantized weights agrees."""
    hf = hf_gemma4(kind)
    ours = ours_from(hf, tmp_path, weights="auto")
    layer = ours.layers[0]
    assert isinstance(layer.attn.q_proj, quant.Int4Linear) and isinstance(layer.mlp.gate_up_proj, quant.Int4Linear)
    assert isinstance(ours.embed, quant.Int4Linear)
    if kind == "e-style":
        assert isinstance(ours.embed_per_layer, quant.Int8Linear)
        assert isinstance(ours.per_layer_model_projection, quant.Int4Linear)
    if kind == "moe":
        assert isinstance(layer.experts[0].gate_up_proj, quant.Int4Linear)
        assert type(layer.router.proj) is torch.nn.Linear
    state = {k: v for k, v in dequantized(ours).items() if not k.endswith("lm_head.weight")}
    hf.load_state_dict(state, strict=False)
    assert set(hf.state_dict()) - set(state) - {"lm_head.weight"} == {
        k for k in hf.state_dict() if "layer_scalar" in k
    } - set(state)
    ids = torch.randint(0, TINY["vocab_size"], (2, 30))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= TOL


def test_published_configs_round_trip_through_transformers():
    """Each published size read back from transformers' own config (both ways of giving the full layers'
    head_dim and kv heads) is itself; the E models' sharing is as Google's."""
    from transformers import Gemma4TextConfig

    for name in GEMMA4_CONFIGS:
        ours = Gemma4Config.from_name(name)
        hf = Gemma4TextConfig(**{k: v for k, v in ours.to_hf().items() if k not in ("architectures", "model_type")})
        assert Gemma4Config.from_hf(hf.to_dict()) == ours, name  # per_layer_config
        assert Gemma4Config.from_hf(ours.to_hf()) == ours, name  # global_head_dim
        modes = hf.kv_sharing_modes
        assert [m == "reuse" for m in modes] == [ours.kv_source(i) != i for i in range(ours.num_layers)]
    e4b = Gemma4Config.from_name("e4b")
    assert [e4b.kv_source(i) for i in (24, 25, 41)] == [22, 22, 23]
    assert Gemma4Config.from_name("e2b").layer_intermediate_size(15) == 12288


def test_multimodal_layout_loads_text_only_and_unused_shared_kv_is_dropped(tmp_path):
    """Google's multimodal files: model.language_model.*, towers beside it, and k/v tensors still stored for the
    KV-shared layers. Loaded text-only with one warning for each, to transformers' logits."""
    hf = hf_gemma4("e-style")
    hf.save_pretrained(tmp_path / "text")
    tensors = load_file(tmp_path / "text" / "model.safetensors")
    tensors = {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()}
    tensors["model.vision_tower.encoder.layers.0.mlp.gate_proj.linear.weight"] = torch.randn(8, 8)
    tensors["model.embed_vision.embedding_projection.weight"] = torch.randn(64, 8)
    tensors["model.audio_tower.layers.0.norm.weight"] = torch.randn(8)
    for name in ("k_proj", "v_proj"):
        tensors[f"model.language_model.layers.5.self_attn.{name}.weight"] = torch.randn(32, 64)
    (tmp_path / "mm").mkdir()
    save_file(tensors, tmp_path / "mm" / "model.safetensors")
    config = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
              "text_config": json.loads((tmp_path / "text" / "config.json").read_text()),
              "vision_config": {"model_type": "gemma4_vision"}}  # fmt: skip
    (tmp_path / "mm" / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = loader.from_pretrained(tmp_path / "mm", dtype=torch.float32, weights="dense")
    messages = [str(w.message) for w in caught]
    assert any("images and audio are not supported" in m for m in messages)
    assert any("KV-shared layers" in m for m in messages)
    ids = torch.randint(0, TINY["vocab_size"], (1, 20))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("group_size", [128, 32])
def test_compressed_tensors_w4a16_loads_exactly(tmp_path, group_size):
    """llm-compressor's W4A16 (pack-quantized, symmetric, group 128 or 32) as the community E4B checkpoint
    quantizes it: the decoder's linears and per_layer_model_projection int4, the embeddings and per-layer
    projection bf16. Packed by the compressed-tensors library; every int4 weight loads exactly."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    hf = hf_gemma4("e-style", hidden_size=128, intermediate_size=128, head_dim=32, global_head_dim=64)
    tensors, expected, g = {}, {}, torch.Generator().manual_seed(0)
    quantized = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "per_layer_model_proj")
    for name, w in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        if w.dim() != 2 or not any(q in name for q in quantized):
            tensors[name] = w.to(torch.bfloat16)
            continue
        n, k = w.shape
        module = name.removesuffix(".weight")
        q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        scales = (torch.rand(n, k // group_size, generator=g) / 50).to(torch.bfloat16)
        tensors[f"{module}.weight_packed"] = pack_to_int32(q, 4)
        tensors[f"{module}.weight_scale"] = scales
        tensors[f"{module}.weight_shape"] = torch.tensor([n, k])
        expected[name] = q.float() * scales.float().repeat_interleave(group_size, dim=1)
    (tmp_path / "ct").mkdir()
    save_file(tensors, tmp_path / "ct" / "model.safetensors")
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}
    quantization = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
                    "ignore": ["lm_head"]}  # fmt: skip
    config = hf.config.to_dict() | {"quantization_config": quantization}
    (tmp_path / "ct" / "config.json").write_text(json.dumps(config))
    _, stored, _ = loader.load_checkpoint(tmp_path / "ct")
    assert len(expected) == 7 * 5 + 4 * 2 + 1  # as the community checkpoint: 5 per layer, k/v where owned, PLE proj
    for name, w in expected.items():
        module = checkpoint.our_name(name).removesuffix(".weight")
        assert f"{module}.zeros" not in stored and torch.equal(quant.dequantize(stored, module), w), name
    ours = loader.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert isinstance(ours.layers[6].attn.q_proj, quant.Int4Linear)
    hf.load_state_dict(dequantized(ours), strict=False)  # the rest, as "auto" quantized it
    ids = torch.randint(0, TINY["vocab_size"], (1, 20))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= TOL


def test_qat_q4_0_unquantized_is_recovered_exactly(tmp_path):
    """Google's QAT "q4_0-unquantized" releases: bf16 weights on a symmetric int4 grid of 32 (q * s, s bf16).
    weights="auto" finds the grid again: the int4 we hold is the QAT integers and scales, exactly."""
    hf = hf_gemma4("31b-style")
    g = torch.Generator().manual_seed(1)
    grids = {}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                n, k = p.shape
                q = torch.randint(-7, 8, (n, k), generator=g).float()
                q[:, ::32] = 7  # each group reaches 7, as QAT's absmax grid does
                s = (torch.rand(n, k // 32, generator=g) / 50 + 1e-3).to(torch.bfloat16)
                p.copy_(q * s.float().repeat_interleave(32, dim=1))
                grids[name] = (q, s)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    hf.float()
    _, stored, _ = loader.load_checkpoint(tmp_path)
    tensors = quant.convert_state_dict(stored, "auto")
    for name, (q, s) in grids.items():
        module = checkpoint.our_name(name).removesuffix(".weight")
        assert torch.equal(quant.unpack_int4(tensors[f"{module}.int4_data"]).float(), q), name
        assert torch.equal(tensors[f"{module}.scales"], s), name


@pytest.mark.parametrize("kind", ["moe", "e-style"])
def test_convert_round_trips_and_transformers_reads_the_dense_export(tmp_path, kind, tokenizer_file):
    """convert.py: HF dense -> our int4 -> our int4 again (the same tensors); -> dense bf16 (experts stacked
    again), which transformers reads as we do; GGUF (no gemma4 writer yet) is a clear error."""
    import convert

    hf = hf_gemma4(kind)
    hf.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    convert.convert(str(tmp_path / "src"), tmp_path / "int4", "int4")
    _, a, _ = loader.load_checkpoint(tmp_path / "int4")
    convert.convert(str(tmp_path / "int4"), tmp_path / "again", "int4")
    _, b, _ = loader.load_checkpoint(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    convert.convert(str(tmp_path / "int4"), tmp_path / "dense", "dense")
    from transformers import Gemma4ForCausalLM

    back = Gemma4ForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    ours = loader.from_pretrained(tmp_path / "dense", dtype=torch.float32, weights="dense")
    ids = torch.randint(0, TINY["vocab_size"], (1, 20))
    with torch.no_grad():
        assert (ours(ids) - back(ids).logits).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="Gemma 4"):
        convert.convert(str(tmp_path / "int4"), tmp_path / "x.gguf", "gguf")
