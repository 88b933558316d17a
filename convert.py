"""Convert a Gemma 3 checkpoint between formats.

    python convert.py gaunernst/gemma-3-1b-it-int4 gemma-3-1b-it-q4_0.gguf --to gguf
    python convert.py model.gguf ./gemma-3-270m-int4 --to int4

The source format is detected: our int4 directory (gaunernst's layout), a dense HF directory, a .gguf
file or a hub id. The output is written to a temporary path and renamed at the end, so a failed or
interrupted conversion leaves no half-written DST.
"""

import argparse
import sys
from pathlib import Path

import checkpoint
import gguf_format
from model import convert_weights, load_checkpoint


def convert(src: str, dst: Path, to: str, weights: str = "auto") -> None:
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; remove it or choose another destination")
    config, tensors, above_4_bits = load_checkpoint(src)
    tensors = convert_weights(tensors, weights, above_4_bits)
    tokenizer = checkpoint.tokenizer_proto(src)
    if to == "gguf":
        gguf_format.save(config, tensors, tokenizer, dst)
    else:
        checkpoint.save(config.to_hf(), tensors, tokenizer, dst)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory, .safetensors or .gguf file, or hub id (owner/name)")
    p.add_argument("dst", type=Path, help="output: a .gguf file, or a directory for int4")
    p.add_argument(
        "--to",
        required=True,
        choices=["gguf", "int4"],  # fmt: skip
        help="gguf: for llama.cpp (int4 -> Q4_0, int8 -> Q8_0); int4: gaunernst's safetensors layout",
    )
    p.add_argument("--weights", choices=["auto", "int4"], default="auto",
                   help="auto: keep each tensor's precision (dense -> int4, GGUF above 4 bits -> 8 bits); "
                        "int4: every linear weight int4 (default auto)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        convert(args.src, args.dst, args.to, args.weights)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
