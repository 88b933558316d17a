"""Perplexity of a model on a text file, with a sliding window; or lm-evaluation-harness tasks (--tasks).

    python eval.py --text README.md --context 1024 --stride 512     # the default model, gemma-3-270m
    python eval.py --model ./gemma-3-1b-it-int4 --text wiki.txt --dtype float32
    python eval.py --model ./gemma-3-1b-it-int4 --tasks mmlu --num-fewshot 5 --output mmlu.json   # pip install .[eval]

Each window starts with <bos> and holds up to --context tokens of the text; consecutive windows
start --stride tokens apart, and each scores only the tokens the previous one did not, so every
token after the first is scored once, with up to context - stride tokens of history.
The result is one JSON object on stdout. With --tasks, the harness (harness.py) scores the model on its tasks:
stdout gets each task's metrics, --output the harness's whole results.
"""

from __future__ import annotations

from gemma3_int4 import hugepages  # noqa: F401  (first: it configures torch's allocator, see hugepages.py)

# isort: split
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from gemma3_int4 import cpu_kernels, files, harness, loader
from gemma3_int4.checkpoint import DEFAULT_MODEL
from gemma3_int4.cli import device_arg, one_line_warnings, positive_int
from gemma3_int4.config import BOS_ID
from gemma3_int4.tokenizer import Tokenizer


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) over ids[0:n_tokens]; each window is <bos> + ids[begin:end]."""
    if not 0 < stride <= context - 1:
        raise ValueError(f"stride must be in 1..context-1, got stride {stride} for context {context}")
    out, scored_to = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context - 1, n_tokens)  # -1: room for <bos>
        out.append((begin, end, scored_to))
        scored_to = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def window_nll(logits_fn, ids: list[int], begin: int, end: int, scored_from: int) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[max(scored_from, begin):end] given <bos> + ids[begin:...]."""
    x = torch.tensor([[BOS_ID, *ids[begin:end]]])
    logits = logits_fn(x)  # (1, T + 1, V): logits[0, j] predicts x[0, j + 1]
    first = max(scored_from, begin) - begin  # index into ids[begin:end]
    targets = x[0, first + 1 :]
    logprobs = torch.log_softmax(logits[0, first : x.shape[1] - 1].float(), dim=-1)
    return -logprobs.gather(-1, targets[:, None]).sum().item(), len(targets)


def perplexity(logits_fn, ids: list[int], context: int, stride: int, progress: bool = True) -> dict:
    """logits_fn: (1, T) ids -> (1, T, V) logits, any model. Returns perplexity, tokens scored, windows."""
    nll, count = 0.0, 0
    spans = windows(len(ids), context, stride)
    for begin, end, scored_from in tqdm(spans, desc="perplexity", unit="window", disable=not progress or None):
        s, n = window_nll(logits_fn, ids, begin, end, scored_from)
        nll, count = nll + s, count + n
    mean = nll / count  # nan if the logits were; past 709, exp overflows a float
    return {"perplexity": math.exp(mean) if mean < 709 else math.inf, "tokens_scored": count, "windows": len(spans)}


def chunked_logits(model, chunk: int = 256):
    """Our model as a logits_fn, computing the 262k-wide head a few positions at a time to bound memory."""

    @torch.no_grad()
    def fn(x: torch.Tensor) -> torch.Tensor:
        h = model.hidden_states(model.embed_tokens(x.to(model.norm.weight.device)))
        return torch.cat([model.logits(h[:, i : i + chunk]).cpu() for i in range(0, h.shape[1], chunk)], dim=1)

    return fn


def read_text(path: Path) -> str:
    """A UTF-8 text file; an error names the file and the first byte that is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"as in generate.py (default {DEFAULT_MODEL})")
    p.add_argument("--text", type=Path, help="a UTF-8 text file")
    p.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (mmlu, hellaswag, ...)")
    p.add_argument("--limit", type=float, default=None, help="with --tasks: examples per task (below 1: a share)")
    p.add_argument("--num-fewshot", type=int, default=None, help="with --tasks: examples in each prompt")
    p.add_argument("--include-path", help="with --tasks: a directory of task YAML files of one's own")
    p.add_argument("--batch-size", type=positive_int, default=8, help="with --tasks: sequences per forward")
    p.add_argument("--output", type=Path, help="with --tasks: write the harness's whole results here (JSON)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="use only the first N tokens of the text")
    p.add_argument("--context", type=positive_int, default=1024,
                   help="tokens per window, <bos> included (default 1024; at most the model's context)")  # fmt: skip
    p.add_argument("--stride", type=positive_int, default=512, help="tokens between window starts (default 512)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="activation dtype, as generate.py runs (default bfloat16; float32: slower)")  # fmt: skip
    p.add_argument(
        "--weights", choices=["auto", "int4", "dense"], default="auto", help="as in generate.py (default auto)"
    )
    p.add_argument("--act", choices=["int8", "bf16"], default=cpu_kernels.ACTIVATIONS,
                   help="with --dtype bfloat16 on CPU, as in generate.py (default %(default)s)")  # fmt: skip
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default cuda if there is a GPU)")  # fmt: skip
    args = p.parse_args(argv)
    if (args.text is None) == (args.tasks is None):
        p.error("give --text (perplexity) or --tasks (lm-evaluation-harness)")
    files.handle_signals()  # SIGTERM, SIGHUP: like Ctrl-C, so that a first run's conversion cleans up
    one_line_warnings()
    try:
        if args.tasks:
            return harness_tasks(args)
        windows(args.context, args.context, args.stride)  # a bad --stride fails before the slow load
        text = read_text(args.text)
        model = loader.from_pretrained(args.model, getattr(torch, args.dtype), args.device, args.weights, args.act)
        if args.context > model.config.max_seq_len:
            raise ValueError(f"--context {args.context} exceeds the model's context of {model.config.max_seq_len}")
        ids = Tokenizer.from_pretrained(args.model).encode(text)[: args.max_tokens]
        if len(ids) < 2:
            raise ValueError(f"{args.text}: too little text to score ({len(ids)} tokens)")
        t0 = time.perf_counter()
        result = perplexity(chunked_logits(model), ids, args.context, args.stride)
        if not math.isfinite(result["perplexity"]):
            raise ValueError(f"the perplexity is {result['perplexity']}: the model's logits are not finite")
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, files.Terminated) as e:
        print(f"[interrupted{f' by {e}' if str(e) else ''}]", file=sys.stderr)
        return files.exit_code(e)
    result.update(model=str(args.model), text=str(args.text), weights=args.weights, dtype=args.dtype, act=args.act,
                  context=args.context, stride=args.stride, seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
    print(json.dumps(result, allow_nan=False))
    return 0


def harness_tasks(args: argparse.Namespace) -> int:
    """--tasks: each task's metrics as one JSON object on stdout, the whole results in --output."""
    if args.output is not None:
        files.check_destination(args.output)  # before the slow part
    model = loader.from_pretrained(args.model, getattr(torch, args.dtype), args.device, args.weights, args.act)
    tokenizer = Tokenizer.from_pretrained(args.model)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    tasks = args.tasks.split(",")
    results = harness.evaluate(model, tokenizer, tasks, limit, args.num_fewshot, args.batch_size, args.include_path)
    if args.output is not None:
        with files.atomic_output(args.output) as tmp:
            tmp.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
