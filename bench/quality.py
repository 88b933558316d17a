"""Perplexity and decode speed of each weights option on the embedded 270M, beside llama.cpp on the same file.

    python bench/quality.py --tokens 4096 --out bench/results/quality-270m.json

Perplexity: the same token ids and windows (eval.py's) for every row, llama.cpp included (its logits
through llama-cpp-python). Decode speed (ours only; llama.cpp's is speed.py's, against its native build):
greedy, 128 new tokens after a short prompt, bf16, one run.
The export rows: convert.py's AWQ and compressed-tensors exports, read back dense (what the engines compute).
The activation rows: the default weights in bf16 with bf16 activations (exact) and int8 (W4A8, w4a8.py),
perplexity and mean KL from the exact path (the rule: int8 is the default only within 1% perplexity).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import chunked_logits, perplexity
from gemma3_int4 import cpu_kernels, loader
from gemma3_int4.checkpoint import embedded_gguf
from gemma3_int4.generation import Sampling, generate
from gemma3_int4.tokenizer import Tokenizer


def text_ids(tok: Tokenizer, n: int) -> list[int]:
    import pydoc_data.topics  # real English documentation text shipped with Python

    return tok.encode("\n\n".join(pydoc_data.topics.topics.values()))[:n]


def decode_speed(step_fn, prompt: list[int], n: int = 128) -> float:
    step_fn(prompt, 8)  # warm-up
    t0 = time.perf_counter()
    got = step_fn(prompt, n)
    return (got - 1) / (time.perf_counter() - t0)


def activation_rows(path: Path, ids: list[int], args) -> list[dict]:
    """The default weights in bf16 with each activation option of the CPU's int4 matmuls (cpu_kernels.ACTIVATIONS):
    perplexity, and the mean KL divergence of the next-token distributions (every position of every window) from
    the exact (bf16) path's.
    Every row of every window runs the option's matmuls (the int8-activation ops take any number of rows), so
    this measures their arithmetic, not where the decode/prefill split lies."""
    exact = chunked_logits(loader.from_pretrained(path, dtype=torch.bfloat16, weights="auto", activations="bf16"))
    int8_model = loader.from_pretrained(path, dtype=torch.bfloat16, weights="auto", activations="int8")
    kl = []

    def int8(x: torch.Tensor) -> torch.Tensor:  # every row through the int8-activation ops
        saved = cpu_kernels.W4A8_MAX_ROWS, cpu_kernels.CPU_KERNEL_MAX_ROWS
        cpu_kernels.W4A8_MAX_ROWS = cpu_kernels.CPU_KERNEL_MAX_ROWS = 1 << 30
        try:
            return chunked_logits(int8_model)(x)
        finally:
            cpu_kernels.W4A8_MAX_ROWS, cpu_kernels.CPU_KERNEL_MAX_ROWS = saved

    def int8_beside_exact(x: torch.Tensor) -> torch.Tensor:  # KL(exact || int8) at every position, kept
        p, q = (torch.log_softmax(fn(x)[0].float(), dim=-1) for fn in (exact, int8))
        kl.append((p.exp() * (p - q)).sum(-1))
        return q[None]

    rows = [{"name": "ours --weights auto, bf16, --act bf16",
             "perplexity": perplexity(exact, ids, args.context, args.stride)["perplexity"]},
            {"name": "ours --weights auto, bf16, --act int8",
             "perplexity": perplexity(int8_beside_exact, ids, args.context, args.stride)["perplexity"],
             "mean_kl": torch.cat(kl).mean().item()}]  # fmt: skip
    print(rows, file=sys.stderr)
    return rows


def export_rows(path: Path, ids: list[int], args) -> list[dict]:
    """The AWQ and compressed-tensors exports (convert.py), read back dense: the weights the engines compute with."""
    import convert

    rows = []
    for to in ("awq", "compressed-tensors"):
        with tempfile.TemporaryDirectory() as tmp:
            convert.convert(path, Path(tmp) / to, to)
            model = loader.from_pretrained(Path(tmp) / to, dtype=torch.float32, weights="dense")
            ppl = perplexity(chunked_logits(model), ids, args.context, args.stride)["perplexity"]
        rows.append({"name": f"convert.py --to {to}, read back dense", "perplexity": ppl})
        print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    path = embedded_gguf()
    tok = Tokenizer.from_pretrained(path)
    ids = text_ids(tok, args.tokens)
    prompt = tok.encode("The history of the printing press", bos=True)
    rows = []
    for weights, dtype in [("dense", torch.float32), ("auto", torch.float32), ("int4", torch.float32)]:
        model = loader.from_pretrained(path, dtype=dtype, weights=weights)
        ppl = perplexity(chunked_logits(model), ids, args.context, args.stride)["perplexity"]
        fast = loader.from_pretrained(path, dtype=torch.bfloat16, weights=weights)
        run = lambda prompt, n, m=fast: len(list(generate(m, prompt, n, Sampling(temperature=0))))
        rows.append({"name": f"ours --weights {weights}", "perplexity": ppl, "decode_tok_s": decode_speed(run, prompt)})
        print(rows[-1], file=sys.stderr)
    rows += export_rows(path, ids, args)
    rows += activation_rows(path, ids, args)
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=args.context, n_batch=args.context, n_ubatch=args.context,
                logits_all=True, n_threads=torch.get_num_threads(), verbose=False)  # fmt: skip

    def llama_logits(x: torch.Tensor) -> torch.Tensor:
        llm.reset()
        llm.eval(x[0].tolist())
        return torch.from_numpy(np.array(llm.scores[: x.shape[1]])).unsqueeze(0)

    ppl = perplexity(llama_logits, ids, args.context, args.stride)["perplexity"]
    # no speed: this environment's llama.cpp is the test extra's portable build (speed.py runs the native one)
    rows.append({"name": "llama.cpp (the Q4_K_M file as is)", "perplexity": ppl})
    print(rows[-1], file=sys.stderr)
    table = ["| weights | perplexity | mean KL from --act bf16 | decode tok/s (bf16) |", "|---|---|---|---|"]
    for r in rows:
        kl, speed = r.get("mean_kl"), r.get("decode_tok_s")
        cells = [f"{r['perplexity']:.3f}", "" if kl is None else f"{kl:.5f}", "" if speed is None else f"{speed:.1f}"]
        table.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    print("\n".join(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"tokens": len(ids), "context": args.context, "stride": args.stride, "threads": torch.get_num_threads()}
        args.out.write_text(json.dumps({"setup": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
