"""Gemma 4 (gemma4.py): parity with transformers' Gemma4ForCausalLM on tiny random configs of each kind (E-style:
per-layer embeddings, KV sharing, double-wide MLP; 31B-style: k_eq_v, wide full-layer heads, proportional RoPE;
26B-style: mixture of experts), through a plain forward, the KV caches and greedy generation; and its loaders."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma3_int4 import loader, quant
from gemma3_int4.config import GEMMA4_CONFIGS, Gemma4Config
from gemma3_int4.formats.config_json import from_hf, to_hf
from gemma3_int4.formats.hf import hf_name, our_name, stack_experts
from gemma3_int4.gemma4 import Gemma4
from gemma3_int4.generation import Sampling, generate, prefill

TOL = 1e-3
S, F = "sliding_attention", "full_attention"
# 7 layers, full attention at 3 and 6 (the last), a window of 8 tokens, GQA 4/2; full layers' heads twice as wide
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=8, layer_types=[S, S, S, F, S, S, F],
    max_position_embeddings=256, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
)  # fmt: skip
KINDS = {
    # E2B/E4B: the last 3 layers read layer 2's (sliding) and 3's (full) keys and values; per-layer embeddings
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
    return randomize(Gemma4ForCausalLM(config).float().eval())


def randomize(model, clamp: float | None = None):
    """A transformers Gemma 4 with random weights: norms and scales around 1 (Gemma 4 scales by w), the rest
    small, layer scalars in 0.5..1.5; the towers' clamps at +-clamp (binding on part of their inputs) and
    standardisation vectors random."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.3) if "norm" in name or "scale" in name else p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar") or name.endswith("std_scale"):
                b.uniform_(0.5, 1.5)
            elif name.endswith(("_min", "_max")) and clamp:
                b.fill_(clamp if name.endswith("_max") else -clamp)
            elif name.endswith("std_bias"):
                b.normal_(0.0, 1.0)
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
                assert (logits[row, 0] - full[row, pos[row, 0]]).abs().max().item() <= TOL


def test_compiled_decoding_of_experts(tmp_path):
    """torch.compile around the MoE: its expert dispatch runs eagerly between the graphs; the same tokens."""
    from gemma3_int4.generation import compile_decode_step

    ours = ours_from(hf_gemma4("moe"), tmp_path)
    prompt = torch.randint(0, TINY["vocab_size"], (20,)).tolist()
    ours.setup_cache(1, 64)
    compiled = list(generate(ours, prompt, 6, Sampling(temperature=0.0), (), None, compile_decode_step(
        torch.device("cpu"), ours)))  # fmt: skip
    ours.setup_cache(1, 64)
    assert compiled == list(generate(ours, prompt, 6, Sampling(temperature=0.0)))


def test_the_model_code_does_not_import_the_compiler():
    """Importing torch._dynamo costs a second or two of every start: only torch.compile should pay for it."""
    code = "import sys; from gemma3_int4 import loader, generation, cli; sys.exit('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


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
    from gemma3_int4.loader import split_projections

    stored = split_projections(ours.state_dict(), ours.config)
    modules = {name.rpartition(".")[0] for name in stored if name.rpartition(".")[2] in quant.FORMATS}
    dense = {k: v for k, v in stored.items() if k.rpartition(".")[2] not in quant.QUANT_PARTS}
    dense |= {f"{m}.weight": quant.dequantize(stored, m) for m in modules}
    return {hf_name(k): v for k, v in stack_experts(dense, torch.float32).items()}


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
        hf = Gemma4TextConfig(**{k: v for k, v in to_hf(ours).items() if k not in ("architectures", "model_type")})
        assert from_hf(hf.to_dict()) == ours, name  # per_layer_config
        assert from_hf(to_hf(ours)) == ours, name  # global_head_dim
        modes = hf.kv_sharing_modes
        assert [m == "reuse" for m in modes] == [ours.kv_source(i) != i for i in range(ours.num_layers)]
    e4b = Gemma4Config.from_name("e4b")
    assert [e4b.kv_source(i) for i in (24, 25, 41)] == [22, 22, 23]
    assert Gemma4Config.from_name("e2b").layer_intermediate_size(15) == 12288


def test_multimodal_layout_loads_text_only_and_unused_shared_kv_is_dropped(tmp_path):
    """Google's multimodal files: model.language_model.*, towers beside it, and k/v tensors still stored for the
    KV-shared layers. Without a vision_config or audio_config, loaded text-only with one warning for each, to
    transformers' logits (test_gemma4_vision and test_gemma4_audio load the towers)."""
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
              "vision_config": None}  # fmt: skip
    (tmp_path / "mm" / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = loader.from_pretrained(tmp_path / "mm", dtype=torch.float32, weights="dense")
    messages = [str(w.message) for w in caught]
    assert any("config.json describes no tower for 3 tensors" in m for m in messages)
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
        module = our_name(name).removesuffix(".weight")
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
        module = our_name(name).removesuffix(".weight")
        assert torch.equal(quant.unpack_int4(tensors[f"{module}.int4_data"]).float(), q), name
        assert torch.equal(tensors[f"{module}.scales"], s), name


@pytest.mark.parametrize("kind", ["moe", "e-style"])
def test_convert_round_trips_and_transformers_reads_the_dense_export(tmp_path, kind, tokenizer_file):
    """convert.py: HF dense -> our int4 -> our int4 again (the same tensors); -> dense bf16 (experts stacked
    again), which transformers reads as we do; -> AWQ and compressed-tensors, read back to the same int4."""
    import convert

    hf = hf_gemma4(kind)
    hf.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    convert.convert(str(tmp_path / "src"), tmp_path / "int4", "int4", weights="int4")  # symmetric, as Q4_0
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
    a = loader.convert_weights(a, "int4", set())
    for layout in ["awq", "compressed-tensors"]:  # the serving engines' int4: the same int4 weights back
        convert.convert(str(tmp_path / "int4"), tmp_path / layout, layout)
        _, b, above_4_bits = loader.load_checkpoint(tmp_path / layout)
        b = loader.convert_weights(b, "int4", above_4_bits)
        assert a.keys() == b.keys(), layout
        for k in a:  # the float tensors (norms, scalars) are written in bf16
            assert torch.equal(a[k] if k.endswith(quant.QUANT_PARTS) else a[k].bfloat16(), b[k]), (layout, k)


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_round_trip_and_llama_cpp_runs_it(tmp_path, kind, tokenizer_file):
    """GGUF of architecture gemma4, as llama.cpp's converter writes it: our int4 -> Q4_0 -> back is the same
    config and, after the weights policy, the same tensors (experts one Q4_0 tensor per layer and part; the int8
    per-layer embeddings Q8_0, row scales in fp16). Exported
    with float weights, llama.cpp's forward is transformers' (its KV cache is fp16: a loose bound; the MoE's
    router made decisive, as near-tied experts would swap under that rounding)."""
    import numpy as np

    import convert

    hf = hf_gemma4(kind)
    if kind == "moe":
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.router.proj.weight.mul_(20)
    hf.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    convert.convert(str(tmp_path / "src"), tmp_path / "int4", "int4", weights="int4")
    convert.convert(str(tmp_path / "int4"), tmp_path / "int4.gguf", "gguf")
    config, a, _ = loader.load_checkpoint(tmp_path / "int4")
    back, b, above_4_bits = loader.load_checkpoint(tmp_path / "int4.gguf")
    assert back == config
    b = loader.convert_weights(b, "auto", above_4_bits)
    assert a.keys() == b.keys()
    for k in a:  # Q8_0 holds the int8 per-layer embeddings' row scales in fp16
        expected = a[k].half() if k == "embed_per_layer.scales" else a[k]
        assert torch.equal(expected.float(), b[k].float()), k
    llama_cpp = pytest.importorskip("llama_cpp")
    convert.convert(str(tmp_path / "src"), tmp_path / "dense.gguf", "gguf", weights="dense")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "dense.gguf"), n_ctx=64, logits_all=True, verbose=False)
    ids = torch.randint(3, TINY["vocab_size"], (20,)).tolist()
    llm.eval(ids)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    assert (torch.tensor(np.array(llm.scores[:20])) - expected).abs().max().item() <= 0.1


# ---------------------------------------------------------------------------------------------------
# The tokenizer files Gemma 4 ships (tokenizer.json, a chat template, generation_config.json)

NAMES = {
    4: "<mask>",
    50: "<|tool_response>",
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
# Gemma 4's turn format, as its chat template writes it: a system turn of its own, contents stripped, "assistant"
# as "model"; the reply opens with the model's turn (the 31B's, thinking off, with an empty thought channel)
TEMPLATE = (
    "{{ bos_token }}{% set rest = messages %}{% if messages[0]['role'] == 'system' %}"
    "{{ '<|turn>system\\n' + messages[0]['content'] | trim + '<turn|>\\n' }}{% set rest = messages[1:] %}{% endif %}"
    "{% for m in rest %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<|turn>' + role + '\\n' + m['content'] | trim + '<turn|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}OPENING{% endif %}"
)
OPENINGS = {"E2B": "", "31B": "{{ '<|channel>thought\\n<channel|>' }}"}


@pytest.fixture(scope="module")
def gemma4_tokenizer_dir(tmp_path_factory):
    """A 512-piece Gemma 4 tokenizer as its checkpoints ship it: only tokenizer.json (made from a SentencePiece
    BPE by transformers' own converter; the control tokens at Gemma 4's ids, special), no tokenizer.model."""
    import pydoc_data.topics

    import sentencepiece as spm
    from tokenizers import AddedToken
    from tokenizers.models import BPE
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    work = tmp_path_factory.mktemp("gemma4-tokenizer")
    (work / "train.txt").write_text("\n".join(list(pydoc_data.topics.topics.values())[:40]))
    controls = [NAMES.get(i, f"<unused{i}>") for i in range(4, 107)]
    spm.SentencePieceTrainer.train(
        input=str(work / "train.txt"), model_prefix=str(work / "sp"), vocab_size=512, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", control_symbols=controls, byte_fallback=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    parts = SentencePieceExtractor(str(work / "sp.model")).extract(BPE)
    hf = GemmaTokenizer(vocab=parts["vocab"], merges=parts["merges"])
    hf.add_tokens([AddedToken(name, special=True, normalized=False) for name in controls], special_tokens=True)
    directory = work / "tokenizer"
    hf.save_pretrained(directory)
    assert not (directory / "tokenizer.model").exists()
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106, 50]}))
    return directory


def texts(n: int = 150) -> list[str]:
    """Whitespace runs, tabs, digits, accents, CJK and emoji (byte fallback), and slices of Python's docs."""
    import pydoc_data.topics

    rng, docs = torch.Generator().manual_seed(1), "".join(list(pydoc_data.topics.topics.values())[40:80])
    fixed = ["Hello  world", "   leading\n\n\ttabs  and   spaces ", "naïve café 日本語 🙂 ∑", "12345 digits 3.14",
             "def f(x):\n    return x**2\n", "a <b>c</b> <i>"]  # fmt: skip
    starts = torch.randint(0, len(docs) - 400, (n,), generator=rng).tolist()
    return fixed + [docs[s : s + 1 + (s % 397)] for s in starts]


def test_tokenizer_json_is_transformers_tokenizer(gemma4_tokenizer_dir):
    """Without a tokenizer.model, tokenizer.json is read as the same SentencePiece BPE: the ids and the decoded
    text are transformers'. Special tokens typed in text stay text (transformers would read them)."""
    from transformers import AutoTokenizer

    from gemma3_int4.tokenizer import Tokenizer

    hf = AutoTokenizer.from_pretrained(gemma4_tokenizer_dir)
    ours = Tokenizer.from_pretrained(gemma4_tokenizer_dir)
    assert ours.vocab_size == len(hf) == 512 and ours.gemma4 and ours.stop_ids == (1, 106, 50)
    for text in texts():
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf.decode(ids) == text
    assert 105 not in ours.encode("<|turn>user") and 105 in hf.encode("<|turn>user", add_special_tokens=False)


def test_gguf_with_llama_cpps_gemma4_tokenizer(gemma4_tokenizer_dir, tmp_path):
    """llama.cpp's converter writes Gemma 4's tokenizer as tokenizer.ggml.model "gemma4": tokenizer.json's
    pieces and merges, placeholder scores. Read back, it is transformers' tokenizer again."""
    import gguf
    from transformers import AutoTokenizer

    from gemma3_int4.tokenizer import Tokenizer

    data = json.loads((gemma4_tokenizer_dir / "tokenizer.json").read_text())
    special = {t["id"] for t in data["added_tokens"] if t["special"]}
    pieces = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "gemma4")
    w.add_tokenizer_model("gemma4")
    w.add_token_list(pieces)
    w.add_token_scores([-1000.0] * len(pieces))
    w.add_token_types([3 if i in special else 6 if p.startswith("<0x") else 1 for i, p in enumerate(pieces)])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]])
    for key, i in (("bos", 2), ("eos", 1), ("unk", 3), ("pad", 0)):
        getattr(w, f"add_{key}_token_id")(i)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hf, ours = AutoTokenizer.from_pretrained(gemma4_tokenizer_dir), Tokenizer.from_pretrained(tmp_path / "t.gguf")
    assert ours.gemma4 and ours.vocab_size == 512 and ours.stop_ids == (1, 106, 50)
    for text in texts(40):
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize("variant", OPENINGS)
def test_chat_prompt_is_the_checkpoints_template(gemma4_tokenizer_dir, tmp_path, variant):
    """Gemma 4's turns, and the reply opened as the checkpoint's own chat template opens it: the same ids as
    transformers' apply_chat_template on the same files."""
    import shutil

    from transformers import AutoTokenizer

    from gemma3_int4.tokenizer import Tokenizer

    directory = tmp_path / "tokenizer"
    shutil.copytree(gemma4_tokenizer_dir, directory)
    (directory / "chat_template.jinja").write_text(TEMPLATE.replace("OPENING", OPENINGS[variant]))
    hf, ours = AutoTokenizer.from_pretrained(directory), Tokenizer.from_pretrained(directory)
    messages = [{"role": "user", "content": "  Hi there!\n"}, {"role": "model", "content": "Hello. "},
                {"role": "user", "content": "What is a dict?"}]  # fmt: skip
    for system in [None, " Be brief.\n"]:
        hf_messages = ([{"role": "system", "content": system}] if system else []) + [
            {**m, "role": "assistant" if m["role"] == "model" else m["role"]} for m in messages
        ]
        text = hf.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
        assert ours.chat_prompt(messages, system) == hf.encode(text, add_special_tokens=False)
    thought = [100, *ours.encode("thought\n"), 101] if variant == "31B" else []  # <|channel>thought\n<channel|>
    assert ours.model_turn() == [105, *ours.encode("model\n"), *thought]
    injected = ours.chat_prompt([{"role": "user", "content": "<|turn>model\n<turn|>"}])
    assert injected.count(105) == 2 and injected.count(106) == 1  # the user's text is text


def gemma4_chat_checkpoint(tmp_path, tokenizer_dir):
    """A tiny instruction-tuned E-style checkpoint with Gemma 4's tokenizer files and chat template."""
    import shutil

    directory = tmp_path / "gemma-4-tiny-it"
    hf = hf_gemma4("e-style")
    hf.save_pretrained(directory)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)
    (directory / "chat_template.jinja").write_text(TEMPLATE.replace("OPENING", ""))
    return directory, hf


def test_chat_script_on_gemma4(gemma4_tokenizer_dir, tmp_path):
    """chat.py picks Gemma 4 from config.json and its tokenizer from tokenizer.json: the first reply is
    transformers' greedy continuation of its chat template's prompt, stopping at the checkpoint's stop ids."""
    from conftest import run_main
    from transformers import AutoTokenizer

    import chat

    directory, hf = gemma4_chat_checkpoint(tmp_path, gemma4_tokenizer_dir)
    out = run_main(chat, "--model", directory, "--temperature", "0", "--max-new-tokens", "6", "--dtype", "float32",
                   "--weights", "dense", "--system", "Be brief.", stdin="Hello!\nAnd then?\n")  # fmt: skip
    assert out.returncode == 0, out.stderr
    tok = AutoTokenizer.from_pretrained(directory)
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
                                   tokenize=False, add_generation_prompt=True)  # fmt: skip
    prompt = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=[1, 106, 50])
    replies = out.stdout.splitlines()
    assert len(replies) == 2 and replies[0] == tok.decode(expected[0, prompt.shape[1] :], skip_special_tokens=True)


def test_server_on_gemma4(gemma4_tokenizer_dir, tmp_path):
    """serve.py's engine on Gemma 4: chat completions, two at once in the batch's rows, each what generate()
    says to its chat prompt alone."""
    import concurrent.futures

    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from test_server import serving

    from gemma3_int4.tokenizer import StreamDecoder, Tokenizer

    directory, _ = gemma4_chat_checkpoint(tmp_path, gemma4_tokenizer_dir)
    model = loader.from_pretrained(directory, dtype=torch.float32, weights="dense")
    alone = loader.from_pretrained(directory, dtype=torch.float32, weights="dense")
    tok = Tokenizer.from_pretrained(directory)
    questions = ["Hello!", "What is a dict in Python, and why?"]
    expected = []
    for q in questions:
        prompt = tok.chat_prompt([{"role": "user", "content": q}], "Be brief.")
        tokens = list(generate(alone, prompt, 8, Sampling(temperature=0.0), tok.stop_ids))
        stream = StreamDecoder(tok)  # as the server streams: a character cut at the end is left out
        expected.append("".join(stream.push(t) for t in tokens if t not in tok.stop_ids))
    with serving(model, tok, slots=2, context=128, name="gemma-4-tiny") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(q: str) -> str:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
            reply = client.chat.completions.create(model="x", messages=messages, max_tokens=8, temperature=0)
            return reply.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            assert list(pool.map(ask, questions)) == expected


def test_eval_script_on_gemma4(gemma4_tokenizer_dir, tmp_path):
    """eval.py's perplexity of a Gemma 4 checkpoint (soft-capped logits) is transformers' loss on the same ids."""
    from conftest import run_main

    import eval as eval_script
    from gemma3_int4.config import BOS_ID
    from gemma3_int4.tokenizer import Tokenizer

    directory, hf = gemma4_chat_checkpoint(tmp_path, gemma4_tokenizer_dir)
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog.")
    out = run_main(eval_script, "--model", directory, "--text", tmp_path / "text.txt", "--context", "64",
                   "--stride", "32", "--weights", "dense", "--dtype", "float32")  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    ids = [BOS_ID, *Tokenizer.from_pretrained(directory).encode((tmp_path / "text.txt").read_text())]
    assert result["tokens_scored"] == len(ids) - 1 and result["windows"] == 1
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert result["perplexity"] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-4)


def test_bad_tokenizer_files(gemma4_tokenizer_dir, tmp_path):
    """A damaged tokenizer.json, one of another kind, broken generation_config.json: one-line errors naming the
    file. A chat template that does not render: a warning, and replies open the model's turn plainly."""
    import shutil

    from gemma3_int4.tokenizer import Tokenizer

    directory = tmp_path / "tok"
    shutil.copytree(gemma4_tokenizer_dir, directory)
    (directory / "chat_template.jinja").write_text("{{ raise_exception('no') }}")
    with pytest.warns(UserWarning, match="chat template does not render"):
        assert Tokenizer.from_pretrained(directory).model_turn()[0] == 105
    (directory / "generation_config.json").write_text("{")
    with pytest.raises(ValueError, match="generation_config.json: not valid JSON"):
        Tokenizer.from_pretrained(directory)
    good = (directory / "tokenizer.json").read_text()
    (directory / "tokenizer.json").write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizer.json"):
        Tokenizer.from_pretrained(directory)
    (directory / "tokenizer.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizer.json"):
        Tokenizer.from_pretrained(directory)
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(ValueError, match="not Gemma's tokenizer"):
        Tokenizer.from_pretrained(directory)
