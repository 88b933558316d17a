"""Parity of the decoder with HF transformers (float32, tiny random configs), and the KV cache."""

import json

import pytest
import torch
from conftest import TINY, hf_text_model

from model import CONFIGS, TEXT_VOCAB_SIZE, Gemma3, Gemma3Config

TOL = 1e-3


def ours_from(hf_model, tmp_path) -> Gemma3:
    hf_model.save_pretrained(tmp_path)
    return Gemma3.from_pretrained(tmp_path, dtype=torch.float32, weights="dense")


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA 4/2, linear RoPE scaling, query_pre_attn_scalar 24 != head_dim 32
        dict(num_key_value_heads=1, query_pre_attn_scalar=32, rope_scaling=None),  # like 270M/1B: MQA, no scaling
        dict(num_key_value_heads=4, num_hidden_layers=13, sliding_window=5),  # MHA, two global layers
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
    ref = Gemma3.from_pretrained(tmp_path, dtype=torch.float32, weights="dense")(ids)
    got = Gemma3.from_pretrained(tmp_path, dtype=torch.bfloat16, weights="dense")(ids)
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
        hf = hf_class(**ours.to_hf()).to_dict()
        assert Gemma3Config.from_hf(hf) == ours, name
        assert (ours.vision_config is None) == (name in ("270m", "1b")), name
        assert sum(ours.global_layers) == ours.num_layers // 6


def test_config_from_real_multimodal_layout():
    """google/gemma-3-4b-it's config.json omits the fields that take transformers' defaults."""
    hf = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152},
    }  # fmt: skip
    assert Gemma3Config.from_hf(hf) == Gemma3Config.from_name("4b")


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="'llama' is not Gemma 3"):
        Gemma3Config.from_hf({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(ValueError, match="no 'hidden_size'"):
        Gemma3Config.from_hf({"model_type": "gemma3_text", "num_hidden_layers": 2, "intermediate_size": 8})
    with pytest.raises(ValueError, match="soft-capping"):
        Gemma3Config.from_hf({**TINY, "model_type": "gemma3_text", "final_logit_softcapping": 30.0})
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        Gemma3Config.from_hf({**TINY, "model_type": "gemma3_text", "rope_scaling": {"rope_type": "yarn"}})
    with pytest.raises(ValueError, match="unknown Gemma 3 size"):
        Gemma3Config.from_name("3b")


def test_config_json_roundtrip(tmp_path):
    c = Gemma3Config.from_name("27b")
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf()))
    assert Gemma3Config.from_hf(json.loads((tmp_path / "config.json").read_text())) == c
