"""Serve Gemma 3 (or Gemma 4 text) over OpenAI's HTTP API, with a chat page, many requests decoding in one batch.

python serve.py                                   # the embedded 270M on http://127.0.0.1:8000
python serve.py --model gaunernst/gemma-3-4b-it-int4 --max-batch 4 --context 8192
curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 64}'

Endpoints: POST /v1/chat/completions and /v1/completions (stream: true for server-sent events),
GET /v1/models, GET /health, and a chat page at http://HOST:PORT/. Concurrent requests share each decode
step, one KV-cache row (--max-batch of them, --context tokens each) per request; more wait in a queue
(--max-queue; beyond it: 503). A reply ends at the request's max_tokens, or --max-tokens (default 1024).
A line per request is logged on stderr (--quiet: none). Images (4B, 12B, 27B) come as data: URLs; nothing is fetched.
Requests must name the server in their Host header (localhost, an IP address, --host, or --allow-host), so
that web pages cannot reach it through DNS rebinding. Ctrl-C or SIGTERM: in-flight requests get
--shutdown-timeout seconds to finish, then are cancelled. Exits 1 if the engine fails, for a supervisor to
restart it.
"""

from gemma3_int4 import hugepages  # noqa: F401  (first: it configures torch's allocator, see hugepages.py)

# isort: split
import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch

from gemma3_int4.cli import REPLY_LIMIT, add_model_arguments, load, note_if_base_model, positive_float, positive_int
from gemma3_int4.generation import compile_decode_step, decode_one_token

if not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn")):
    sys.exit("error: serve.py needs FastAPI and uvicorn: pip install -e '.[serve]'")
from gemma3_int4.engine import Engine
from gemma3_int4.gate import LOCAL_NAMES
from gemma3_int4.server import build_app, listen, serve


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="requests decoding together, one KV-cache row each (default 8)")  # fmt: skip
    p.add_argument("--context", type=positive_int, default=4096,
                   help="tokens per request, prompt and reply (default 4096, at most the model's)")  # fmt: skip
    p.add_argument("--max-tokens", type=positive_int, default=REPLY_LIMIT,
                   help=f"a reply's length when the request sets no max_tokens (default {REPLY_LIMIT})")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="log no line per request")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for a row before the server answers 503 (default 64)")  # fmt: skip
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on all but the page and /health "
                   "(default: no key)")  # fmt: skip
    p.add_argument("--name", help="the model's name in /v1/models (default: --model's last part)")
    p.add_argument("--max-body-mb", type=positive_int, default=32,
                   help="largest request body, images included, in MB (default 32)")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds in-flight requests get to finish on shutdown (default 5)")  # fmt: skip
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="serve requests whose Host header is NAME too (default: localhost, IP addresses and "
                        "--host); repeatable; '*' serves any name")  # fmt: skip
    p.add_argument("--max-connections", type=positive_int, default=100,
                   help="open connections; more are closed at once (default 100; keep it under ulimit -n)")  # fmt: skip
    p.add_argument("--idle-timeout", type=positive_float, default=5.0,
                   help="seconds a connection has to send each request's head (default 5)")  # fmt: skip
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # first: a port in use is an error before the model loads
        sock = listen(args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {os.strerror(e.errno) if e.errno else e}",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        model, tokenizer = load(args)
        context = min(args.context, model.config.max_seq_len)
        step = compile_decode_step(torch.device(args.device), model) if args.compile else decode_one_token
        engine = Engine(model, args.max_batch, context, step, every_row=args.compile, max_queue=args.max_queue)
        if args.compile:
            print("compiling the decode step (about a minute) ...", file=sys.stderr)
            engine.warm_up()
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    note_if_base_model(args, tokenizer)
    log = None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True)
    app = build_app(engine, tokenizer, args.name or Path(str(args.model)).name, args.api_key, args.max_body_mb * 2**20,
                    [*LOCAL_NAMES, args.host, *args.allow_host], args.max_tokens, log)  # fmt: skip
    print(f"serving {args.model} on http://{args.host}:{args.port}/ ({args.max_batch} rows of {context} tokens)",
          file=sys.stderr)  # fmt: skip
    served = serve(app, engine, sock, args.shutdown_timeout, args.max_connections, args.idle_timeout)
    if engine.failure is not None:
        print(f"error: the engine failed ({engine.failure!r}): restart the server", file=sys.stderr)
    return 0 if served else 1


if __name__ == "__main__":
    sys.exit(main())
