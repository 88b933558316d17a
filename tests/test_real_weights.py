"""The real Gemma 3 270M (google/gemma-3-270m, Q4_K_M GGUF from PyPI) against transformers and llama.cpp."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import llama_logits, text_sample
from safetensors.torch import save_file

from eval import chunked_logits, perplexity
from gemma3_int4 import loader, quant
from gemma3_int4.checkpoint import DEFAULT_MODEL_CACHE, RANKER, read_ranker
from gemma3_int4.generation import Sampling, generate
from gemma3_int4.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Die Katze sitzt auf der Matte, und",
    "東京は日本の首都で、",
    "Ingredients: 2 eggs, 1 cup of flour,",
]


@pytest.fixture(scope="module")
def tok(real_gguf):
    return Tokenizer.from_pretrained(real_gguf)


@pytest.fixture(scope="module")
def dense(real_gguf):
    return loader.from_pretrained(real_gguf, dtype=torch.float32, weights="dense")


def test_tokenizer_matches_transformers_and_llama_cpp(real_gguf, tok):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    llm = Llama(model_path=str(real_gguf), vocab_only=True, verbose=False)
    texts = [text_sample(200_000), *PROMPTS, "héllo wörld 🦀🤖 ∑∫ Ünïcödé", "  two  spaces\tand\ttabs\n\n\n  ",
             "مرحبا بالعالم", "Привет, мир!", "x = [1, 2, 3]  # 12345678901234567890"]  # fmt: skip
    for text in texts:
        ours = tok.encode(text)
        assert ours == llm.tokenize(text.encode(), add_bos=False, special=False), text[:40]
        assert tok.decode(ours) == text
        # transformers' GGUF tokenizer splits runs of 32+ spaces (longer than Gemma's longest whitespace
        # piece) differently from SentencePiece and llama.cpp (greedy longest piece); elsewhere all three agree.
        text = re.sub(" {32,}", " " * 31, text)
        assert tok.encode(text) == hf(text, add_special_tokens=False).input_ids, text[:40]


def test_dense_logits_match_transformers(dense, hf_real, tok):
    """Float32, weights dequantized by gguf: max |Δ logits| <= 1e-3 on prompts of different kinds,
    and on 700 tokens of real text (past the 512-token sliding window)."""
    for text in [*PROMPTS, text_sample(3000)]:
        ids = torch.tensor([tok.encode(text, bos=True)[:700]])
        with torch.no_grad():
            diff = (dense(ids) - hf_real(ids).logits).abs().max().item()
        assert diff <= 1e-3, (text[:40], diff)


def test_greedy_continuations_match_transformers(dense, hf_real, tok):
    for text in PROMPTS:
        prompt = tok.encode(text, bos=True)
        expected = hf_real.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :]
        expected = expected.tolist()
        got = list(generate(dense, prompt, 24, Sampling(temperature=0), stop_ids=(1,)))
        assert got == expected[: len(got)] and (len(got) == 24 or got[-1] == 1), text


def test_llama_cpp_agrees_with_ours(real_gguf, dense, llama_real, tok):
    """llama.cpp runs the same file with its quantized matmuls (activations quantized to 8 bits):
    close distributions (its logits also carry a per-position offset, which softmax ignores), same top tokens."""
    ids = tok.encode(text_sample(2000), bos=True)[:300]
    ours = chunked_logits(dense)(torch.tensor([ids]))
    theirs = llama_logits(llama_real, ids)
    ours, theirs = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
    kl = (ours.exp() * (ours - theirs)).sum(-1)  # KL(ours || llama.cpp) per position
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"llama.cpp vs ours: mean KL {kl.mean():.5f}, max KL {kl.max():.4f}, top-1 agreement {agree:.3f}")
    assert kl.mean().item() < 0.02 and agree > 0.9  # measured: KL 0.006, agreement 0.947


def test_default_import_perplexity_is_within_5_percent_of_llama_cpp(real_gguf, llama_real, tok):
    """weights="auto" keeps each tensor at the precision the GGUF has (int8 for Q5_0/Q8_0/K-quants);
    naive int4 of everything loses much more. Evaluated on text the tests do not tune on."""
    ids = tok.encode(text_sample(40_000, offset=200_000))[:2048]
    llama_ppl = perplexity(lambda x: llama_logits(llama_real, x[0].tolist()), ids, 1024, 512, progress=False)
    auto = loader.from_pretrained(real_gguf, dtype=torch.float32, weights="auto")
    auto_ppl = perplexity(chunked_logits(auto), ids, 1024, 512, progress=False)
    assert auto_ppl["perplexity"] <= 1.05 * llama_ppl["perplexity"]
    int4 = loader.from_pretrained(real_gguf, dtype=torch.float32, weights="int4")
    int4_ppl = perplexity(chunked_logits(int4), ids, 1024, 512, progress=False)
    assert int4_ppl["perplexity"] > auto_ppl["perplexity"]


def test_ranked_int8_head_decodes_as_the_int8_head(real_gguf, tok):
    """The default import's int8 head, ranked by its int4 copy (Int8Linear.unembed), gives the same greedy
    continuations as the int8 head alone."""
    model = loader.from_pretrained(real_gguf, dtype=torch.float32)
    ranker = model.embed.ranker
    for prompt in PROMPTS:
        ids = tok.encode(prompt, bos=True)
        model.embed.ranker = ranker
        ranked = list(generate(model, ids, 24, Sampling(temperature=0)))
        model.embed.ranker = None
        assert ranked == list(generate(model, ids, 24, Sampling(temperature=0))), prompt


def test_generate_runs_the_embedded_default_model(tmp_path):
    """No --model: the 270M from PyPI is converted once into the cache, then reused."""
    env = {**os.environ, "GEMMA3_INT4_CACHE": str(tmp_path)}
    cmd = [sys.executable, "generate.py", "--prompt", "The capital of France is", "--temperature", "0",
           "--max-new-tokens", "8", "--stats-json"]  # fmt: skip
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "converting" in first.stderr and (tmp_path / DEFAULT_MODEL_CACHE / "config.json").exists()
    assert "France" in first.stdout  # the base 270M continues: " the capital of the country of France."
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and "converting" not in second.stderr
    assert second.stdout == first.stdout
    assert json.loads(second.stderr.strip().splitlines()[-1])["prompt_tokens"] == 6
    # the int8 head's int4 ranker was cached at conversion, and loads take it as it is
    directory = tmp_path / DEFAULT_MODEL_CACHE
    ranker = read_ranker(directory, 262144, 640)
    assert set(ranker) == {"int4_data", "scales"} and ranker["int4_data"].shape == (262144, 320)
    save_file({k: v.flip(0).contiguous() for k, v in ranker.items()}, directory / RANKER)
    assert torch.equal(loader.from_pretrained(directory).embed.ranker.int4_data, ranker["int4_data"].flip(0))


def test_eval_script(real_gguf, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(text_sample(3000, offset=100_000))
    cmd = [sys.executable, "eval.py", "--model", str(real_gguf), "--text", str(text), "--max-tokens", "300",
           "--context", "256", "--stride", "128"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["tokens_scored"] == 300 and 1 < result["perplexity"] < 100


def test_gguf_import_keeps_each_tensors_precision(real_gguf):
    """Tensors come out exactly as gguf's own dequantizers give them: `auto` keeps those stored above 4 bits
    (the Q8_0 embedding, Q5_0 attn_q) at 8 bits, as Int8Linear, and the Q4_K attn_output as int4 with zeros."""
    import gguf

    from gemma3_int4.formats.gguf import open_gguf
    from gemma3_int4.loader import load_checkpoint
    from gemma3_int4.quant import Int4Linear, Int8Linear, dequantize

    _, tensors, above_4_bits = load_checkpoint(real_gguf)
    raw = {t.name: t for t in open_gguf(real_gguf).tensors}
    pairs = [("embed", "token_embd.weight"), ("layers.0.attn.q_proj", "blk.0.attn_q.weight"),
             ("layers.0.attn.o_proj", "blk.0.attn_output.weight")]  # fmt: skip
    for ours, theirs in pairs:
        t = raw[theirs]
        assert t.tensor_type in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_0,
                                 gguf.GGMLQuantizationType.Q4_K)  # fmt: skip
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_K:
            assert torch.equal(dequantize(tensors, ours), expected) and f"{ours}.weight" not in above_4_bits
        else:
            assert torch.equal(tensors[f"{ours}.weight"], expected), ours
            assert f"{ours}.weight" in above_4_bits
    model = loader.from_pretrained(real_gguf, dtype=torch.float32)
    assert all(isinstance(m, Int8Linear) for m in (model.embed, model.layers[0].attn.qkv_proj))
    assert isinstance(model.layers[0].attn.o_proj, Int4Linear) and model.layers[0].attn.o_proj.zeros is not None
    assert model.embed.ranker is not None  # the int8 head is ranked by an int4 copy (Int8Linear.unembed)


def test_gguf_export_runs_in_llama_cpp(real_gguf, tmp_path, tok):
    """Our GGUF export (Q4_0 for int4, Q4_K for the Q4_K weights' int4 with zeros, Q8_0 for int8, F32 norms, the
    full tokenizer, no donor file) loads in llama.cpp, which agrees with us on it; int4 -> GGUF -> int4 is
    bit-exact on the real model, and its Q4_K tensors go out byte for byte as they came."""
    import gguf
    import numpy as np
    from llama_cpp import Llama

    from gemma3_int4.formats.gguf import open_gguf
    from gemma3_int4.loader import load_checkpoint
    from gemma3_int4.quant import convert_state_dict

    ids = tok.encode(text_sample(2000, offset=50_000), bos=True)[:300]
    for weights in ("auto", "int4"):
        dst = tmp_path / f"{weights}.gguf"
        out = subprocess.run([sys.executable, "convert.py", str(real_gguf), str(dst), "--to", "gguf", "--weights",
                              weights], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, out.stderr
        llm = Llama(model_path=str(dst), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, verbose=False)
        assert llm.tokenize(text_sample(5000).encode(), add_bos=False, special=False) == tok.encode(text_sample(5000))
        ours = loader.from_pretrained(dst, dtype=torch.float32)
        a = torch.log_softmax(chunked_logits(ours)(torch.tensor([ids])), -1)
        b = torch.log_softmax(llama_logits(llm, ids), -1)
        kl = (a.exp() * (a - b)).sum(-1).mean().item()
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        print(f"export {weights}: llama.cpp vs ours KL {kl:.5f}, top-1 agreement {agree:.3f}")
        assert kl < 0.02 and agree > 0.9
    _, original, above = load_checkpoint(real_gguf)
    original = convert_state_dict(original, "int4", above)
    _, exported, _ = load_checkpoint(tmp_path / "int4.gguf")
    assert exported.keys() == original.keys()
    for name, t in original.items():
        assert torch.equal(exported[name].float(), t.float()), name
    raw = {t.name: t for t in open_gguf(real_gguf).tensors}
    for t in open_gguf(tmp_path / "auto.gguf").tensors:
        if raw[t.name].tensor_type == gguf.GGMLQuantizationType.Q4_K:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_K and np.array_equal(t.data, raw[t.name].data)


def test_serving_exports_round_trip_on_the_real_model(real_gguf, tmp_path, tok):
    """The real 270M, every linear int4, through AWQ and compressed-tensors and back: bit-exact, the bf16
    embedding included (its int4 grid is recovered from the bf16 values); the Q4_K weights, whose float zeros
    neither holds, come back refitted with integer zero points (exactly quant.quantize_int4_asymmetric's,
    weighted by the inputs' mean squares on the calibration text)."""
    import convert
    from gemma3_int4 import ptq
    from gemma3_int4.loader import load_checkpoint

    convert.convert(str(real_gguf), tmp_path / "int4", "int4", weights="int4")
    config, original, _ = load_checkpoint(tmp_path / "int4")
    with_zeros = {name.removesuffix(".zeros") for name in original if name.endswith(".zeros")}
    assert with_zeros  # attn_output and half the ffn_down
    calibration = ptq.calibration_ids(tok, None, *convert.REFIT_CALIBRATION)
    column_weights = ptq.input_mean_squares(config, original, calibration)
    for to in ("awq", "compressed-tensors"):
        with pytest.warns(UserWarning, match=f"{len(with_zeros)} weight.s. .* refitted with integer zero points"):
            convert.convert(str(tmp_path / "int4"), tmp_path / to, to)
        convert.convert(str(tmp_path / to), tmp_path / f"{to}-back", "int4")
        _, back = load_checkpoint(tmp_path / f"{to}-back")[:2]
        assert back.keys() == original.keys()
        for module in with_zeros:
            refit = quant.quantize_int4_asymmetric(quant.dequantize(original, module), True, column_weights[module])
            for part, x in zip(("int4_data", "scales", "zeros"), refit, strict=True):
                assert torch.equal(back[f"{module}.{part}"].float(), x.float()), f"{to}: {module}.{part}"
        for name, t in back.items():
            if name.rpartition(".")[0] not in with_zeros:
                assert torch.equal(t, original[name]), f"{to}: {name}"


def test_dense_export_tokenizes_and_generates_in_transformers_as_we_do(real_gguf, tmp_path, tok):
    """The real 270M exported dense: transformers reads its tokenizer.json (user-defined whitespace pieces, byte
    fallback, 262k merges) as we tokenize, <bos> added as the GGUF says, and greedy-decodes what we do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import convert

    convert.convert(str(real_gguf), tmp_path / "dense", "dense")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "dense")
    for text in [text_sample(100_000), *PROMPTS, "  two  spaces\tand\ttabs\n\n\n  ", "héllo 🦀🤖 ∑∫ Привет"]:
        assert theirs(text).input_ids == tok.encode(text, bos=True), text[:40]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    ours = loader.from_pretrained(tmp_path / "dense", dtype=torch.float32, weights="dense")
    prompt = theirs(PROMPTS[0]).input_ids
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt) :].tolist()
    assert list(generate(ours, prompt, 16, Sampling(temperature=0), tok.stop_ids)) == expected


def test_eval_help_example_runs_in_bf16_by_default(monkeypatch):
    """eval.py's own first example (the default model on README.md) runs as printed, scoring in bf16 by default,
    within 2% of float32."""
    from conftest import run_main

    import eval as eval_script

    example = next(line for line in eval_script.__doc__.splitlines() if "python eval.py" in line)
    args = example.split("#")[0].split()[2:] + ["--max-tokens", "400"]
    monkeypatch.chdir(ROOT)
    results = []
    for extra in ([], ["--dtype", "float32"]):
        out = run_main(eval_script, *args, *extra)
        assert out.returncode == 0, out.stderr
        results.append(json.loads(out.stdout))
    bf16, fp32 = results
    assert bf16["dtype"] == "bfloat16" and bf16["tokens_scored"] == 400 and 1 < bf16["perplexity"] < 100
    assert abs(bf16["perplexity"] / fp32["perplexity"] - 1) < 0.02
