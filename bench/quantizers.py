"""Perplexity of the embedded 270M with every weight int4: round to nearest against GPTQ (ptq.py).

    python bench/quantizers.py --out bench/results/ptq-270m.json

The dense weights are the GGUF's, dequantized (float32). The evaluation is bench/quality.py's: the first
--tokens tokens of pydoc's topics, eval.py's windows, float32 activations. GPTQ calibrates on ptq.py's
calibration text (standard-library docstrings), which shares no text with the evaluation.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality import text_ids

from eval import chunked_logits, perplexity
from gemma3_int4 import loader, ptq, quant
from gemma3_int4.checkpoint import embedded_gguf
from gemma3_int4.tokenizer import Tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--calibration-seqs", type=int, default=64)
    p.add_argument("--calibration-len", type=int, default=512)
    p.add_argument("--one-pass", action="store_true", help="also GPTQ calibrated on the dense model in one pass")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    path = embedded_gguf()
    config, tensors, _ = loader.load_checkpoint(path)
    dense = quant.convert_state_dict(tensors, "dense")
    tok = Tokenizer.from_pretrained(path)
    ids = text_ids(tok, args.tokens)
    calibration = ptq.calibration_ids(tok, num_seqs=args.calibration_seqs, seq_len=args.calibration_len)

    rows = []

    def row(name: str, tensors: dict[str, torch.Tensor], **extra) -> None:
        model = loader.from_tensors(config, tensors, torch.float32)
        ppl = perplexity(chunked_logits(model), ids, args.context, args.stride)["perplexity"]
        rows.append({"name": name, "perplexity": ppl, **extra})
        print(rows[-1], file=sys.stderr)

    row("dense (float32)", dense)
    row("int4, round to nearest", quant.convert_state_dict(dense, "int4"))
    for sequential in (False, True) if args.one_pass else (True,):
        t0 = time.perf_counter()
        gptq = ptq.gptq(config, dense, calibration, sequential=sequential)
        seconds = time.perf_counter() - t0
        how = "layer by layer" if sequential else "one dense pass"
        row(f"int4, GPTQ ({how})", gptq, quantize_seconds=round(seconds, 1))
    head8 = dict(zip(("embed.int8_data", "embed.scales"), quant.quantize_int8(dense["embed.weight"]), strict=True))
    without_head = {k: v for k, v in gptq.items() if not k.startswith("embed.")}
    row("int4, GPTQ (layer by layer), int8 head (round to nearest)", without_head | head8)

    table = ["| weights | perplexity | quantization (s) |", "|---|---|---|"]
    table += [f"| {r['name']} | {r['perplexity']:.2f} | {r.get('quantize_seconds', '')} |" for r in rows]
    print("\n".join(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"tokens": len(ids), "context": args.context, "stride": args.stride, "threads": torch.get_num_threads(),
                "calibration": list(calibration.shape)}  # fmt: skip
        args.out.write_text(json.dumps({"setup": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
