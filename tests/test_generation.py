"""Sampling against transformers' logits processors, and the decode loop against transformers' generate."""

import json
from pathlib import Path

import pytest
import torch
from conftest import hf_text_model, run_main

import generate as generate_script
from gemma3_int4 import loader
from gemma3_int4.generation import (
    Batch,
    Request,
    Sampling,
    compile_decode_step,
    decode_one_token,
    generate,
    generate_batch,
    prefill,
    sample,
)
from gemma3_int4.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.randn(3, 100)
    assert torch.equal(sample(logits, Sampling(temperature=0)), logits.argmax(-1))
    assert torch.equal(sample(logits, Sampling(temperature=5.0, top_k=1)), logits.argmax(-1))


def test_seeded_sampling_reproduces():
    logits = torch.randn(1, 1000)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [int(sample(logits, Sampling(), generator=g)) for _ in range(20)]

    assert draw(1) == draw(1) and len(set(draw(1))) > 1
    assert draw(1) != draw(2)


def support(logits, s: Sampling) -> set[int]:
    """The tokens sample() can return: draw many times."""
    g = torch.Generator().manual_seed(0)
    return {int(t) for t in sample(logits.expand(4000, -1), s, generator=g)}


@pytest.mark.parametrize("s", [Sampling(top_k=5), Sampling(top_p=0.6), Sampling(min_p=0.2),
                               Sampling(temperature=0.7, top_k=8, top_p=0.9, min_p=0.05)])  # fmt: skip
def test_filters_match_transformers(s):
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(3)) * 2
    ref = TemperatureLogitsWarper(s.temperature)(None, logits.clone())
    if s.top_k:
        ref = TopKLogitsWarper(s.top_k)(None, ref)
    if s.min_p:
        ref = MinPLogitsWarper(s.min_p)(None, ref)
    if s.top_p < 1:
        ref = TopPLogitsWarper(s.top_p)(None, ref)
    allowed = set(torch.nonzero(ref[0] > float("-inf")).flatten().tolist())
    assert support(logits, s) == allowed


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 50)
    seen_ids = torch.tensor([[3, 7, 7, 20, 41]])
    seen = torch.zeros(1, 50, dtype=torch.bool)
    seen[0, seen_ids[0]] = True
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    from gemma3_int4.generation import apply_repetition_penalty

    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), expected)


def test_bad_sampling_settings():
    for kwargs, msg in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
                        ({"min_p": 1.0}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            Sampling(**kwargs)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = hf_text_model()
    directory = tmp_path_factory.mktemp("dense")
    hf.save_pretrained(directory)
    return hf, loader.from_pretrained(directory, dtype=torch.float32, weights="dense")


def test_greedy_generation_matches_transformers(models):
    """40 new tokens: far past the sliding window of 8, through the cache."""
    hf, ours = models
    prompt = [2, 17, 300, 45, 99, 12]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40)
    got = list(generate(ours, prompt, 40, Sampling(temperature=0)))
    assert got == expected[0, len(prompt) :].tolist()


def test_stop_ids_and_max_new_tokens(models):
    _, ours = models
    prompt = [2, 17, 300, 45]
    tokens = list(generate(ours, prompt, 12, Sampling(temperature=0)))
    assert len(tokens) == 12
    stop = tokens[4]
    stopped = list(generate(ours, prompt, 12, Sampling(temperature=0), stop_ids=(stop,)))
    assert stopped == tokens[: tokens.index(stop) + 1]


def test_generate_sets_up_its_own_cache_after_a_batched_one(models):
    _, ours = models
    ours.setup_cache(batch_size=2, max_seq_len=64)
    tokens = list(generate(ours, [2, 17, 300], 5, Sampling(temperature=0)))  # reallocates a batch-1 cache
    assert ours.cache_batch == 1 and len(tokens) == 5


def run_batch(model, requests, joins, rows, **kw):
    """Run requests through a Batch of `rows` rows: request i joins before step joins[i] (when a row is free)."""
    model.setup_cache(rows, 64)
    batch, waiting, step = Batch(model, **kw), list(zip(joins, requests, strict=True)), 0
    while waiting or batch.active():
        while waiting and waiting[0][0] <= step and batch.free_rows():
            batch.add(waiting.pop(0)[1])
        batch.step()
        step += 1
    return [r.tokens for r in requests]


def test_generate_batch_yields_each_request_as_it_finishes(models):
    _, ours = models
    requests = [Request([2, 17, 300], n, Sampling(temperature=0)) for n in (9, 1, 4, 6)]
    finished = list(generate_batch(ours, requests, rows=2, context=64))
    assert finished == [requests[1], requests[2], requests[0], requests[3]]  # 1 at its first token; 2 before 0
    assert [len(r.tokens) for r in requests] == [9, 1, 4, 6] and {r.finish_reason for r in requests} == {"length"}
    assert requests[0].tokens == list(generate(ours, [2, 17, 300], 9, Sampling(temperature=0)))
    with pytest.raises(ValueError, match="a prompt has 64 tokens: it must have 1 to 63"):
        list(generate_batch(ours, [Request([2] * 64, 5)], rows=2, context=64))


def test_batched_requests_generate_as_each_alone(models):
    """Five requests through three rows, joining as rows free up: prompts of different lengths (past the window of
    8), greedy and seeded sampling, a stop id, a short max_new_tokens. Each must generate what it does alone."""
    _, ours = models
    prompts = [[2, 17, 300, 45], [2, 5] * 9, [2, 99, 7], [2, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [2, 40]]
    greedy, sampled = Sampling(temperature=0), Sampling(temperature=1.0, top_k=20)
    settings = [(greedy, 30, None), (sampled, 25, 5), (greedy, 6, None), (sampled, 30, 11), (greedy, 30, None)]
    alone = []
    for prompt, (s, n, seed) in zip(prompts, settings, strict=True):
        gen = seed and torch.Generator().manual_seed(seed)
        alone.append(list(generate(ours, prompt, n, s, generator=gen or None)))
    stop = alone[4][7]  # request 4 stops at its 8th token (or sooner)

    def requests():
        return [Request(p, n, s, (stop,) if i == 4 else (), seed and torch.Generator().manual_seed(seed) or None)
                for i, (p, (s, n, seed)) in enumerate(zip(prompts, settings, strict=True))]  # fmt: skip

    alone[4] = alone[4][: alone[4].index(stop) + 1]
    assert run_batch(ours, requests(), [0, 0, 3, 4, 9], rows=3) == alone
    assert run_batch(ours, requests(), [0, 1, 2, 3, 4], rows=3, every_row=True) == alone  # all rows each step


def nan_logits_in_row_0(from_step: int):
    """A decode step whose logits for row 0 turn NaN from its from_step-th call on (the model breaking down
    on one sequence): top-k sampling then keeps no candidate, and raises."""
    calls = []

    def step(model, tokens, pos, rows=slice(None)):
        logits = decode_one_token(model, tokens, pos, rows)
        calls.append(1)
        if len(calls) >= from_step:
            logits[0] = float("nan")
        return logits

    return step


def test_a_row_whose_sampling_fails_fails_alone(models):
    """Two rows in flight; row 0's sampling fails at its 4th token: its request finishes with the error and
    the tokens it had, the other generates what it does alone."""
    _, ours = models
    sampled = Sampling(temperature=1.0, top_k=20)
    prompts = [[2, 17, 300, 45], [2, 99, 7]]
    alone = list(generate(ours, prompts[1], 20, sampled, generator=torch.Generator().manual_seed(5)))
    requests = [Request(p, 20, sampled, generator=torch.Generator().manual_seed(5)) for p in prompts]
    run_batch(ours, requests, [0, 0], rows=2, decode_step=nan_logits_in_row_0(from_step=3))
    assert requests[0].finish_reason == "error" and isinstance(requests[0].error, IndexError)
    assert len(requests[0].tokens) == 3
    assert requests[1].tokens == alone and requests[1].finish_reason == "length" and requests[1].error is None
    with pytest.raises(IndexError):  # generate() is a batch of one: its request's error is raised
        list(generate(ours, prompts[0], 20, sampled, decode_step=nan_logits_in_row_0(from_step=3)))


def test_batched_int4_decoding_matches_single_rows(tiny_int4_dir):
    """bf16 int4 through PyTorch's CPU int4 kernel, several rows a matmul: greedy tokens as each request alone,
    eager and compiled (every row, one shape)."""
    model = loader.from_pretrained(tiny_int4_dir)
    prompts = [[2, 17, 300, 45, 99], [2, 8], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    alone = [list(generate(model, p, 24, Sampling(temperature=0))) for p in prompts]
    requests = lambda: [Request(p, 24, Sampling(temperature=0)) for p in prompts]
    assert run_batch(model, requests(), [0, 2, 5], rows=3) == alone
    step = compile_decode_step(torch.device("cpu"))  # compiled bf16 rounds otherwise than eager: its own reference
    alone = [list(generate(model, p, 24, Sampling(temperature=0), decode_step=step)) for p in prompts]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert run_batch(model, requests(), [0, 2, 5], rows=3, decode_step=step, every_row=True) == alone
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for every step of the batch


def test_seeded_generation_reproduces(models):
    _, ours = models
    run = lambda seed: list(generate(ours, [2, 5], 15, Sampling(), generator=torch.Generator().manual_seed(seed)))
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_prompt_longer_than_context(models):
    _, ours = models
    with pytest.raises(ValueError, match="prompt has 300 tokens, but the model's context is 256"):
        next(generate(ours, [5] * 300, 10, Sampling()))
    with pytest.raises(ValueError, match="empty"):
        next(generate(ours, [], 10, Sampling()))
    assert len(list(generate(ours, [5] * 250, 100, Sampling(temperature=0)))) == 6  # clipped to the context


def test_compiled_decode_step_matches_eager_and_compiles_once(tiny_int4_dir):
    """bf16 int4 (the CPU kernels inside the graph): compiled steps agree with eager ones, and neither new
    positions nor a new prompt in the reused cache trigger a recompilation."""
    model = loader.from_pretrained(tiny_int4_dir)
    step = compile_decode_step(torch.device("cpu"))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model.setup_cache(1, 64)
    with torch.no_grad():
        prefill(model, torch.tensor([[2, 17, 300, 45, 99]]))
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(5, 30):  # far past the sliding window of 8
            token, pos = torch.tensor([[t * 7 % 500]]), torch.tensor([[t]])  # (B, 1) each
            # eager first: both write the same keys and values at pos, so the compiled step sees the same cache
            eager = decode_one_token(model, token, pos)
            torch.testing.assert_close(step(model, token, pos), eager, rtol=0.05, atol=0.05 * eager.abs().max().item())
        list(generate(model, [2, 8, 9], 20, Sampling(temperature=0), decode_step=step))  # a new sequence
    assert counters["stats"]["unique_graphs"] == 1


def run_generate(*args):
    return run_main(generate_script, *args)


def test_generate_script_streams_and_reports(tiny_int4_dir):
    out = run_generate("--model", str(tiny_int4_dir), "--prompt", "Hello", "--temperature", "0",
                       "--max-new-tokens", "12", "--stats-json", "--dtype", "float32")  # fmt: skip
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stderr.strip().splitlines()[-1])
    assert {"prompt_tokens", "new_tokens", "load_s", "prefill_tok_s", "decode_tok_s", "peak_mem_mb"} <= stats.keys()
    tok = Tokenizer.from_file(tiny_int4_dir / "tokenizer.model")
    prompt = tok.chat_prompt([{"role": "user", "content": "Hello"}])  # the name says -it: chat template
    assert stats["prompt_tokens"] == len(prompt)
    ours = loader.from_pretrained(tiny_int4_dir, dtype=torch.float32)
    tokens = [t for t in generate(ours, prompt, 12, Sampling(temperature=0)) if t not in (1, 106)]
    assert out.stdout == tok.decode(tokens) + "\n"
    raw = run_generate("--model", str(tiny_int4_dir), "--prompt", "Hello", "--raw", "--max-new-tokens", "3",
                       "--stats-json", "--seed", "1")  # fmt: skip
    assert json.loads(raw.stderr.strip().splitlines()[-1])["prompt_tokens"] == len(tok.encode("Hello", bos=True))


def test_generate_script_several_prompts(tiny_int4_dir, tmp_path):
    """--prompt repeated and --prompt-file: one JSON line per reply, each what the prompt gets alone."""
    prompts = ["Hello", "The answer is", "x"]
    (tmp_path / "prompts.txt").write_text("The answer is\n\nx\n")
    out = run_generate("--model", str(tiny_int4_dir), "--prompt", "Hello", "--prompt-file", tmp_path / "prompts.txt",
                       "--temperature", "0", "--max-new-tokens", "9", "--max-batch", "2", "--raw",
                       "--stats-json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    replies = sorted((json.loads(line) for line in out.stdout.splitlines()), key=lambda r: r["index"])
    assert [r["prompt"] for r in replies] == prompts
    stats = json.loads(out.stderr.strip().splitlines()[-1])
    assert stats["prompts"] == 3 and stats["rows"] == 2
    for r in replies:
        alone = run_generate("--model", str(tiny_int4_dir), "--prompt", r["prompt"], "--temperature", "0",
                             "--max-new-tokens", "9", "--raw")  # fmt: skip
        assert alone.stdout == r["text"] + "\n" and r["finish_reason"] in ("stop", "length")
    out = run_generate("--model", str(tiny_int4_dir), "--prompt", "a", "--prompt", "b", "--image", "x.png")
    assert out.returncode == 2 and "--image goes with a single prompt" in out.stderr
    out = run_generate("--model", str(tiny_int4_dir), "--prompt-file", tmp_path / "missing.txt")
    assert out.returncode == 2 and "--prompt-file" in out.stderr and "missing.txt" in out.stderr


def test_generate_script_errors(tiny_int4_dir, tmp_path):
    out = run_generate("--model", str(tmp_path / "missing"), "--prompt", "x")
    assert out.returncode == 1 and "error: no such checkpoint" in out.stderr and "Traceback" not in out.stderr
    out = run_generate("--model", str(tiny_int4_dir), "--prompt", "word " * 400)
    assert out.returncode == 2 and "but the model's context is 256 tokens" in out.stderr
    out = run_generate("--model", str(tiny_int4_dir), "--prompt", "x", "--top-p", "2")
    assert out.returncode == 1 and "top_p" in out.stderr


def test_ctrl_c_stops_generate_cleanly(tiny_int4_dir, monkeypatch, capsys):
    """Ctrl-C mid-generation: what was streamed stays, a short note on stderr, exit code 130, no traceback."""
    import generate as script

    tok = Tokenizer.from_file(tiny_int4_dir / "tokenizer.model")
    word = next(i for i in range(3, 500) if tok.decode([i]).strip().isalpha())  # a whole word, not a byte piece

    def interrupted(*args, **kwargs):
        yield word
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "generate", interrupted)
    assert script.main(["--model", str(tiny_int4_dir), "--prompt", "Hello", "--raw"]) == 130
    out = capsys.readouterr()
    assert out.out == tok.decode([word])
    assert "[interrupted]" in out.err and "Traceback" not in out.err
