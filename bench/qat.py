"""Int4 perplexity of the 270M after quantization-aware fine-tuning (finetune.py), beside float, round to nearest,
GPTQ and plain fine-tuning rounded to int4 afterwards.

    python bench/qat.py --steps 40 --out bench/results/qat-270m.json

Training text: ptq.calibration_text() (the standard library's docstrings, on which GPTQ calibrates too), as
{"text": ...} lines of finetune.py, with the same arguments for both fine-tunings; evaluation text: pydoc's topics
(quality.text_ids), another text, scored as ptq-270m.json scores it (4096 tokens, context 1024, stride 512,
float32), whose symmetric round-to-nearest and GPTQ rows this reuses (--gptq recomputes GPTQ: minutes more).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality import text_ids

import finetune
from eval import chunked_logits, perplexity
from gemma3_int4 import loader, ptq
from gemma3_int4.checkpoint import DEFAULT_MODEL
from gemma3_int4.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results"


def int4_perplexity(model_path, ids: list[int], weights: str) -> float:
    model = loader.from_pretrained(model_path, torch.float32, weights=weights)
    return perplexity(chunked_logits(model), ids, 1024, 512, progress=False)["perplexity"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens")
    p.add_argument("--gptq", action="store_true", help="quantize with GPTQ here, not reuse ptq-270m.json's row")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    ids = text_ids(tok, args.tokens)
    rows = [{"name": "float (dense float32)", "perplexity": int4_perplexity(DEFAULT_MODEL, ids, "dense")},
            {"name": "int4, --weights int4 (the GGUF's Q4_K kept, with zero points; the rest round to nearest)",
             "perplexity": int4_perplexity(DEFAULT_MODEL, ids, "int4")}]  # fmt: skip
    print(rows, flush=True)
    if args.gptq:
        with tempfile.TemporaryDirectory() as tmp:
            import convert

            convert.convert(DEFAULT_MODEL, Path(tmp) / "gptq", "int4", quantizer="gptq")
            rows.append({"name": "int4, GPTQ", "perplexity": int4_perplexity(Path(tmp) / "gptq", ids, "auto")})
    else:  # symmetric round to nearest of the float weights (QAT's grid before training), and GPTQ
        for row in json.loads((RESULTS / "ptq-270m.json").read_text())["rows"][1:3]:
            rows.append({**row, "name": row["name"] + ", symmetric (ptq-270m.json)"})
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text(json.dumps({"text": ptq.calibration_text()}) + "\n")
        common = ["--data", data, "--full", "--freeze-embeddings", "--steps", args.steps, "--lr", args.lr,
                  "--warmup", max(1, args.steps // 10), "--seq-len", args.seq_len, "--batch-size", args.batch_size,
                  "--held-out", 0.02, "--eval-every", args.steps, "--save-every", 10**9]  # fmt: skip
        for name, extra in [("plain fine-tune, then int4 round to nearest", ["--no-qat"]), ("QAT fine-tune", [])]:
            t0 = time.perf_counter()
            out = Path(tmp) / name.split(",")[0].replace(" ", "-")
            code = finetune.main([str(a) for a in [*common, *extra, "--out", out]])
            if code:
                sys.exit(code)
            seconds = round(time.perf_counter() - t0)
            rows.append({"name": name, "perplexity": int4_perplexity(out, ids, "auto"), "train_seconds": seconds})
            print(rows[-1], flush=True)
    setup = {"tokens": args.tokens, "context": 1024, "stride": 512, "threads": torch.get_num_threads(),
             "fine-tune": {"steps": args.steps, "lr": args.lr, "seq_len": args.seq_len, "batch_size": args.batch_size,
                           "mode": "full, embedding frozen (fake-quantized in the forward)",
                           "text": "ptq.calibration_text()"}}  # fmt: skip
    args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    for row in rows:
        print(f"{row['name']:<60} {row['perplexity']:.2f}")


if __name__ == "__main__":
    main()
