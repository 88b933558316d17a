"""Int4 perplexity of the 270M after quantization-aware fine-tuning (finetune.py), beside float, round to nearest,
GPTQ and plain fine-tuning rounded to int4 afterwards.

    python bench/qat.py --steps 40 --out bench/results/qat-270m.json

Training text: ptq.calibration_text() (the standard library's docstrings, on which GPTQ calibrates too), as
{"text": ...} lines of finetune.py, with the same arguments for both fine-tunings; evaluation text: pydoc's topics
(quality.text_ids), another text, scored as ptq-270m.json scores it (4096 tokens, context 1024, stride 512,
float32), whose symmetric round-to-nearest and GPTQ rows this reuses (--gptq recomputes GPTQ: minutes more).

    python bench/qat.py --from-gptq /tmp/gptq-270m --steps 16 --lr 1e-5 --out bench/results/qat-270m.json

adds one row to --out's, the others kept as they are: QAT fine-tuning that starts from GPTQ's int4 checkpoint
(written to that directory first if it is not there; qat.py keeps each group's grid, so step 0 is GPTQ's model).
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
from gemma3_int4 import checkpoint, loader, ptq, quant
from gemma3_int4.checkpoint import DEFAULT_MODEL
from gemma3_int4.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results"


def int4_perplexity(model_path, ids: list[int], weights: str) -> float:
    model = loader.from_pretrained(model_path, torch.float32, weights=weights)
    return perplexity(chunked_logits(model), ids, 1024, 512, progress=False)["perplexity"]


def gptq_checkpoint(directory: Path) -> Path:
    """The 270M quantized by GPTQ (calibrated on ptq.calibration_text()) into `directory`, unless it is there."""
    if not directory.exists():
        import convert

        convert.convert(DEFAULT_MODEL, directory, "int4", quantizer="gptq")
    return directory


def fine_tune(name: str, args: argparse.Namespace, ids: list[int], out: Path, extra: list) -> dict:
    """finetune.py (full, embedding frozen) on ptq.calibration_text() into `out` -> its row: int4 perplexity and
    seconds."""
    data = out.with_name("train.jsonl")
    data.write_text(json.dumps({"text": ptq.calibration_text()}) + "\n")
    t0 = time.perf_counter()
    code = finetune.main([str(a) for a in ["--data", data, "--full", "--freeze-embeddings", "--steps", args.steps,
                                           "--lr", args.lr, "--warmup", max(1, args.steps // 10), "--seq-len",
                                           args.seq_len, "--batch-size", args.batch_size, "--held-out", 0.02,
                                           "--eval-every", args.steps, "--save-every", 10**9, *extra,
                                           "--out", out]])  # fmt: skip
    if code:
        sys.exit(code)
    seconds = round(time.perf_counter() - t0)
    row = {"name": name, "perplexity": int4_perplexity(out, ids, "auto"), "train_seconds": seconds}
    print(row, flush=True)
    return row


def changed_share(source: Path, tuned: Path) -> float:
    """The share of the int4 values (q) that fine-tuning changed: weights move on a kept grid only by crossing a
    rounding boundary."""
    before, after = checkpoint.load_weights(source)[1], checkpoint.load_weights(tuned)[1]
    names = [n for n in before if n.endswith(".int4_data")]
    changed = sum((quant.unpack_int4(before[n]) != quant.unpack_int4(after[n])).sum().item() for n in names)
    return changed / sum(2 * before[n].numel() for n in names)


def add_gptq_then_qat(args: argparse.Namespace, ids: list[int]) -> None:
    """QAT from GPTQ's checkpoint: its row (with its settings and its starting point's perplexity) into --out."""
    source = gptq_checkpoint(args.from_gptq)
    start = int4_perplexity(source, ids, "auto")
    print(f"GPTQ checkpoint: {start:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gptq-qat"
        row = fine_tune(f"GPTQ, then QAT fine-tune (lr {args.lr:g})", args, ids, out, ["--model", source])
        row |= {"start_perplexity": start, "steps": args.steps, "lr": args.lr,
                "int4_values_changed": changed_share(source, out)}  # fmt: skip
    results = json.loads(args.out.read_text())
    results["rows"] = [r for r in results["rows"] if r["name"] != row["name"]] + [row]
    args.out.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens")
    p.add_argument("--gptq", action="store_true", help="quantize with GPTQ here, not reuse ptq-270m.json's row")
    p.add_argument("--from-gptq", type=Path, metavar="DIR", help="only QAT from the GPTQ checkpoint in DIR "
                   "(quantized there if absent), its row added to --out's")  # fmt: skip
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    ids = text_ids(tok, args.tokens)
    if args.from_gptq:
        add_gptq_then_qat(args, ids)
        return
    rows = [{"name": "float (dense float32)", "perplexity": int4_perplexity(DEFAULT_MODEL, ids, "dense")},
            {"name": "int4, --weights int4 (the GGUF's Q4_K kept, with zero points; the rest round to nearest)",
             "perplexity": int4_perplexity(DEFAULT_MODEL, ids, "int4")}]  # fmt: skip
    print(rows, flush=True)
    if args.gptq:
        with tempfile.TemporaryDirectory() as tmp:
            gptq = gptq_checkpoint(Path(tmp) / "gptq")
            rows.append({"name": "int4, GPTQ", "perplexity": int4_perplexity(gptq, ids, "auto")})
    else:  # symmetric round to nearest of the float weights (QAT's grid before training), and GPTQ
        for row in json.loads((RESULTS / "ptq-270m.json").read_text())["rows"][1:3]:
            rows.append({**row, "name": row["name"] + ", symmetric (ptq-270m.json)"})
    with tempfile.TemporaryDirectory() as tmp:
        plain, qat = Path(tmp) / "plain", Path(tmp) / "qat"
        rows.append(fine_tune("plain fine-tune, then int4 round to nearest", args, ids, plain, ["--no-qat"]))
        rows.append(fine_tune("QAT fine-tune", args, ids, qat, []))
    setup = {"tokens": args.tokens, "context": 1024, "stride": 512, "threads": torch.get_num_threads(),
             "fine-tune": {"steps": args.steps, "lr": args.lr, "seq_len": args.seq_len, "batch_size": args.batch_size,
                           "mode": "full, embedding frozen (fake-quantized in the forward)",
                           "text": "ptq.calibration_text()"}}  # fmt: skip
    args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    for row in rows:
        print(f"{row['name']:<60} {row['perplexity']:.2f}")


if __name__ == "__main__":
    main()
