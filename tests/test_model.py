"""Parity of the decoder with HF transformers (float32, tiny random configs), and the KV cache."""

import json

import pytest
import torch
from conftest import TINY, hf_text_model

from gemma3_int4 import loader
from gemma3_int4.config import CONFIGS, TEXT_VOCAB_SIZE, Gemma3Config
from gemma3_int4.formats.config_json import from_hf, to_hf
from gemma3_int4.formats.hf import hf_name
from gemma3_int4.loader import split_projections
from gemma3_int4.model import Gemma3

TOL = 1e-3


def ours_from(hf_model, tmp_path) -> Gemma3:
    hf_model.save_pretrained(tmp_path)
    return loader.from_pretrained(tmp_path, dtype=torch.float32, weights="dense")


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA 4/2, linear RoPE scaling, query_pre_attn_scalar 24 != head_dim 32
        dict(num_key_value_heads=1, query_pre_attn_scalar=32, rope_scaling=None),  # like 270M/1B: MQA, no scaling
        dict(num_key_value_heads=4, num_hidden_layers=13, sliding_window=5),  # MHA, two global layers
        dict(tie_word_embeddings=False),  # an output head of its own (torchao's checkpoints)
    ],
)
def test_logits_match_transformers(tmp_path, overrides):
    hf = hf_text_model(**overrides)
    ours = ours_from(hf, tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40))  # 40 tokens: 5x the sliding window
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("weights", ["dense", "int4"])
def test_an_untied_head_is_its_own_linear(tmp_path, weights):
    """tie_word_embeddings false: lm_head.weight is the head (quantized like any linear with int4), the embedding
    only looks up; transformers on the same (dequantized) weights agrees, and a tied config drops a stored head."""
    from gemma3_int4 import quant

    hf = hf_text_model(tie_word_embeddings=False)
    with torch.no_grad():
        hf.lm_head.weight.normal_(0.0, 0.1)
    hf.save_pretrained(tmp_path)
    ours = loader.from_pretrained(tmp_path, dtype=torch.float32, weights=weights)
    assert ours.lm_head is not None and ours.head is ours.lm_head
    if weights == "int4":  # transformers gets the weights as ours holds them
        assert isinstance(ours.lm_head, quant.Int4Linear) and isinstance(ours.embed, quant.Int4Linear)
        stored = split_projections(ours.state_dict(), ours.config)
        modules = {name.rpartition(".")[0] for name in stored if name.endswith(".int4_data")}
        dense = {f"{m}.weight": quant.dequantize(stored, m) for m in modules}
        dense |= {k: v for k, v in stored.items() if k.endswith("norm.weight")}
        hf.load_state_dict({hf_name(k): v for k, v in dense.items()})
    ids = torch.randint(0, TINY["vocab_size"], (2, 20))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= TOL
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    tied = loader.from_pretrained(tmp_path, dtype=torch.float32, weights="dense")
    assert tied.lm_head is None and tied.head is tied.embed  # the stored lm_head.weight was dropped


def test_padded_vocab_is_masked(tmp_path):
    hf = hf_text_model(vocab_size=TEXT_VOCAB_SIZE + 64, hidden_size=32, intermediate_size=64, num_hidden_layers=6)
    ours = ours_from(hf, tmp_path)
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert torch.isneginf(got[..., TEXT_VOCAB_SIZE:]).all()
    assert (got[..., :TEXT_VOCAB_SIZE] - expected[..., :TEXT_VOCAB_SIZE]).abs().max().item() <= TOL


def test_bf16_close_to_float32(tmp_path):
    hf = hf_text_model()
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (1, 20))
    ref = loader.from_pretrained(tmp_path, dtype=torch.float32, weights="dense")(ids)
    got = loader.from_pretrained(tmp_path, dtype=torch.bfloat16, weights="dense")(ids)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() < 0.1 * ref.abs().max().item()


@pytest.mark.parametrize("prompt_len, chunk", [(3, 3), (20, 20), (29, 5), (29, 12)])
def test_cached_decoding_matches_full_forward(tmp_path, prompt_len, chunk):
    """Prefill in chunks (shorter and longer than the sliding window of 8), then one token at a time, far past
    the window and a global layer: the local layers' ring buffers must give the full forward's logits."""
    ours = ours_from(hf_text_model(), tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (2, 48))
    with torch.no_grad():
        full = ours(ids)
        ours.setup_cache(batch_size=2, max_seq_len=64)
        steps = []
        for t in range(0, prompt_len, chunk):
            end = min(t + chunk, prompt_len)
            steps.append(ours(ids[:, t:end], torch.arange(t, end)))
        for t in range(prompt_len, ids.shape[1]):
            steps.append(ours(ids[:, t : t + 1], torch.tensor([t])))
    assert all(layer.attn.kv_cache.k.shape[2] == 8 for layer in ours.layers if not layer.is_global)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("overrides", [{}, dict(num_key_value_heads=1)])  # GQA 4/2 (the decode fold), MQA
def test_rows_at_their_own_positions_decode_as_separate_sequences(tmp_path, overrides):
    """Three cache rows, each its own sequence: prefilled one row at a time to different lengths (shorter and
    longer than the window of 8), then decoded together, each row at its own position, far past the window and
    a global layer; the middle row then starts a new, shorter sequence while the others go on, and a step runs
    only the first two rows. Every row's logits must be its own full forward's."""
    ours = ours_from(hf_text_model(**overrides), tmp_path)
    seqs = torch.randint(0, TINY["vocab_size"], (3, 48))
    fresh = torch.randint(0, TINY["vocab_size"], (1, 48))
    with torch.no_grad():
        full = ours(torch.cat([seqs, fresh]))  # (4, 48, V)
        ours.setup_cache(batch_size=3, max_seq_len=64)
        lengths = [3, 20, 11]
        for row, n in enumerate(lengths):
            got = ours(seqs[row : row + 1, :n], torch.arange(n), rows=slice(row, row + 1))
            assert (got - full[row : row + 1, :n]).abs().max().item() <= 1e-4
        pos = torch.tensor(lengths)[:, None]  # (B, 1)
        for _ in range(16):
            got = ours(seqs.gather(1, pos), pos)  # (3, 1, V)
            want = full[torch.arange(3)[:, None], pos]
            assert (got - want).abs().max().item() <= 1e-4
            pos = pos + 1
        ours(fresh[:, :5], torch.arange(5), rows=slice(1, 2))  # row 1: a new sequence, in a row that held 36
        rows = torch.stack([seqs[0], fresh[0], seqs[2]])
        pos[1] = 5
        for step in range(12):
            n = 2 if step % 3 == 0 else 3  # now and then a step for the first rows only
            got = ours(rows[:n].gather(1, pos[:n]), pos[:n], rows=slice(0, n))
            want = torch.cat([full[[0, 3, 2]]])[torch.arange(n)[:, None], pos[:n]]
            assert (got - want).abs().max().item() <= 1e-4
            pos[:n] += 1


def test_rows_must_match_the_cache(tmp_path):
    ours = ours_from(hf_text_model(), tmp_path)
    ours.setup_cache(batch_size=2, max_seq_len=64)
    with pytest.raises(ValueError, match="3 rows of input for 2 rows of the KV cache"):
        ours(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long))


def test_eager_decoding_reads_only_the_filled_cache(tmp_path, monkeypatch):
    """A 64-slot cache holding 6 positions: eager attention reads 6 keys (global) and at most the window's 8
    (local ring), not all 64, and the logits are unchanged (test_cached_decoding_matches_full_forward)."""
    from gemma3_int4 import model as model_module

    ours = ours_from(hf_text_model(), tmp_path)
    read, sdpa = [], model_module.F.scaled_dot_product_attention

    def recording_sdpa(q, k, *args, **kwargs):
        read.append(k.shape[2])
        return sdpa(q, k, *args, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", recording_sdpa)
    ours.setup_cache(batch_size=1, max_seq_len=64)
    with torch.no_grad():
        ours(torch.tensor([[1, 2, 3, 4, 5]]), torch.arange(5))
        read.clear()
        ours(torch.tensor([[6]]), torch.tensor([5]))
    assert sorted(set(read)) == [6]  # 6 < the window: the ring has not wrapped, every layer reads 6
    with torch.no_grad():
        for t in range(6, 20):
            read.clear()
            ours(torch.tensor([[7]]), torch.tensor([t]))
    assert sorted(set(read)) == [8, 20]  # a wrapped ring reads its 8 slots; the global cache 20 of 64


def test_a_reused_cache_forgets_the_previous_sequence(tmp_path):
    """generate() reuses a big enough cache (no new shapes to compile): a new sequence from position 0 must not
    see what the last one left in the ring buffers, even where a stale slot holds the query's own position."""
    ours = ours_from(hf_text_model(), tmp_path)
    ids = torch.randint(0, TINY["vocab_size"], (1, 30))
    old = torch.randint(0, TINY["vocab_size"], (1, 30))
    with torch.no_grad():
        full = ours(ids)
        ours.setup_cache(batch_size=1, max_seq_len=64)
        for end in (5, 30):  # a short old sequence leaves slots that hold exactly their own position
            ours(old[:, :end], torch.arange(end))
            got = [ours(ids[:, :3], torch.arange(3))]
            got += [ours(ids[:, t : t + 1], torch.tensor([t])) for t in range(3, 30)]
            assert (torch.cat(got, dim=1) - full).abs().max().item() <= 1e-4


def test_decoding_without_cache_is_an_error(tmp_path):
    ours = ours_from(hf_text_model(), tmp_path)
    with pytest.raises(RuntimeError, match="setup_cache"):
        ours(torch.tensor([[1, 2]]), torch.arange(2))


def test_cache_longer_than_context_is_an_error(tmp_path):
    ours = ours_from(hf_text_model(), tmp_path)
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        ours.setup_cache(1, 257)


def test_published_configs_match_transformers_defaults():
    """The config.json of every published size, as transformers reads it, gives our table's config."""
    from transformers import Gemma3Config as HFGemma3Config
    from transformers import Gemma3TextConfig

    for name in CONFIGS:
        ours = Gemma3Config.from_name(name)
        hf_class = Gemma3TextConfig if ours.vision_config is None else HFGemma3Config  # 4B/12B/27B: multimodal
        hf = hf_class(**to_hf(ours)).to_dict()
        assert from_hf(hf) == ours, name
        assert (ours.vision_config is None) == (name in ("270m", "1b")), name
        assert sum(ours.global_layers) == ours.num_layers // 6


# The published text configs (Google's config.json files, as ../shared/GEMMA3.md lists them): hidden, layers,
# heads, kv heads, head_dim, FFN, sliding window, vocab, context, global RoPE scaling, query_pre_attn_scalar
PUBLISHED = {
    "270m": (640, 18, 4, 1, 256, 2048, 512, 262144, 32768, None, 256),
    "1b": (1152, 26, 4, 1, 256, 6912, 512, 262144, 32768, None, 256),
    "4b": (2560, 34, 8, 4, 256, 10240, 1024, 262208, 131072, 8.0, 256),
    "12b": (3840, 48, 16, 8, 256, 15360, 1024, 262208, 131072, 8.0, 256),
    "27b": (5376, 62, 32, 16, 128, 21504, 1024, 262208, 131072, 8.0, 168),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_configs_are_the_published_ones(name):
    """Our table against the published values (not against itself): each size's config.json reads to it."""
    hidden, layers, heads, kv, head_dim, ffn, window, vocab, context, factor, scalar = PUBLISHED[name]
    text = {"model_type": "gemma3_text", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim, "intermediate_size": ffn,
            "sliding_window": window, "vocab_size": vocab, "max_position_embeddings": context,
            "query_pre_attn_scalar": scalar, "rope_scaling": factor and {"rope_type": "linear", "factor": factor},
            "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "rms_norm_eps": 1e-6}  # fmt: skip
    hf = text if factor is None else {"model_type": "gemma3", "text_config": text, "vision_config": {}}
    assert from_hf(hf) == Gemma3Config.from_name(name)
    assert Gemma3Config.from_name(name).global_layers == [(i + 1) % 6 == 0 for i in range(layers)]


def test_config_from_real_multimodal_layout():
    """google/gemma-3-4b-it's config.json omits the fields that take transformers' defaults."""
    hf = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152},
    }  # fmt: skip
    assert from_hf(hf) == Gemma3Config.from_name("4b")


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="'llama' is not Gemma 3"):
        from_hf({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(ValueError, match="no 'hidden_size'"):
        from_hf({"model_type": "gemma3_text", "num_hidden_layers": 2, "intermediate_size": 8})
    with pytest.raises(ValueError, match="soft-capping"):
        from_hf({**TINY, "model_type": "gemma3_text", "final_logit_softcapping": 30.0})
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        from_hf({**TINY, "model_type": "gemma3_text", "rope_scaling": {"rope_type": "yarn"}})
    with pytest.raises(ValueError, match="unknown Gemma 3 size"):
        Gemma3Config.from_name("3b")


def test_config_json_roundtrip(tmp_path):
    c = Gemma3Config.from_name("27b")
    (tmp_path / "config.json").write_text(json.dumps(to_hf(c)))
    assert from_hf(json.loads((tmp_path / "config.json").read_text())) == c


def small_state_dict(kinds: dict[str, str]) -> tuple[Gemma3Config, dict[str, torch.Tensor]]:
    """A one-layer config and its q/k/v and gate/up weights in the checkpoints' names, each of the given kind."""
    from gemma3_int4 import quant

    config = Gemma3Config(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32,
                          intermediate_size=96, sliding_window=8, vocab_size=64)  # fmt: skip
    shapes = {"attn.q_proj": 64, "attn.k_proj": 32, "attn.v_proj": 32, "mlp.gate_proj": 96, "mlp.up_proj": 96}
    tensors = {}
    for name, rows in shapes.items():
        w, module = torch.randn(rows, 64), f"layers.0.{name}"
        kind = kinds.get(name, "int4_data")
        if kind == "weight":
            tensors[f"{module}.weight"] = w
        else:
            tensors[f"{module}.{kind}"], tensors[f"{module}.scales"] = quant.FORMATS[kind].quantize(w)
    return config, tensors


def test_projections_are_stacked_by_rows_and_split_back():
    from gemma3_int4.loader import fuse_projections, split_projections

    config, tensors = small_state_dict({"mlp.up_proj": "int4_data"})
    fused = fuse_projections(tensors, config.num_layers)
    assert set(fused) == {
        f"layers.0.{m}.{k}" for m in ("attn.qkv_proj", "mlp.gate_up_proj") for k in ("int4_data", "scales")
    }
    qkv = fused["layers.0.attn.qkv_proj.int4_data"]
    assert qkv.shape == (128, 32) and torch.equal(qkv[64:96], tensors["layers.0.attn.k_proj.int4_data"])
    back = split_projections(fused, config)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert fuse_projections(fused, config.num_layers).keys() == fused.keys()  # stacked ones pass


def test_a_group_of_mixed_kinds_is_stacked_in_its_widest():
    from gemma3_int4 import quant
    from gemma3_int4.loader import fuse_projections

    config, tensors = small_state_dict({"attn.v_proj": "int8_data", "mlp.gate_proj": "weight"})
    fused = fuse_projections(tensors, config.num_layers)
    assert fused["layers.0.attn.qkv_proj.int8_data"].shape == (128, 64)  # int4 q, k and int8 v: all int8
    v = quant.dequantize_int8(fused["layers.0.attn.qkv_proj.int8_data"], fused["layers.0.attn.qkv_proj.scales"])[96:]
    assert torch.equal(
        v, quant.dequantize_int8(tensors["layers.0.attn.v_proj.int8_data"], tensors["layers.0.attn.v_proj.scales"])
    )
    q = quant.dequantize_int4(tensors["layers.0.attn.q_proj.int4_data"], tensors["layers.0.attn.q_proj.scales"].float())
    q8 = quant.dequantize_int8(fused["layers.0.attn.qkv_proj.int8_data"], fused["layers.0.attn.qkv_proj.scales"])[:64]
    assert (q8 - q).abs().max() <= q.abs().amax() / 254 + 1e-6  # int8 per row: finer than the int4 steps
    gate_up = fused["layers.0.mlp.gate_up_proj.weight"]  # a dense gate beside an int4 up: dense
    up = quant.dequantize_int4(
        tensors["layers.0.mlp.up_proj.int4_data"], tensors["layers.0.mlp.up_proj.scales"].float()
    )
    assert torch.equal(gate_up[:96], tensors["layers.0.mlp.gate_proj.weight"]) and torch.equal(gate_up[96:], up)


def test_a_missing_part_of_a_group_is_named():
    from gemma3_int4.loader import fuse_projections

    config, tensors = small_state_dict({})
    del tensors["layers.0.attn.k_proj.int4_data"], tensors["layers.0.attn.k_proj.scales"]
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): layers.0.attn.k_proj.weight"):
        fuse_projections(tensors, config.num_layers)


def test_zero_points_beside_symmetric_int4_are_stacked_with_zeros_of_0():
    from gemma3_int4 import quant
    from gemma3_int4.loader import fuse_projections

    config, tensors = small_state_dict({})
    tensors["layers.0.attn.k_proj.zeros"] = torch.randn(32, 2).to(torch.bfloat16)  # k asymmetric, q and v not
    fused = fuse_projections(tensors, config.num_layers)
    zeros = fused["layers.0.attn.qkv_proj.zeros"]
    assert zeros.shape == (128, 2) and not zeros[:64].any() and not zeros[96:].any()
    w = quant.dequantize(fused, "layers.0.attn.qkv_proj")
    assert torch.equal(w[64:96], quant.dequantize(tensors, "layers.0.attn.k_proj"))
    assert torch.equal(w[:64], quant.dequantize(tensors, "layers.0.attn.q_proj"))
    assert "layers.0.mlp.gate_up_proj.zeros" not in fused  # symmetric groups keep no zeros
