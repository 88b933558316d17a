"""Convert a Gemma 3 (or Gemma 4 text) checkpoint between formats.

    python convert.py gemma-3-270m ./gemma-3-270m-bf16 --to dense     # the embedded default model, by its name
    python convert.py gaunernst/gemma-3-1b-it-int4 gemma-3-1b-it-q4_0.gguf --to gguf
    python convert.py model.gguf ./gemma-3-270m-int4 --to int4
    python convert.py ./gemma-3-1b-it-int4 ./gemma-3-1b-it-awq --to awq
    python convert.py ./gemma-3-1b-it-int4 ./gemma-3-1b-it-w4a16 --to compressed-tensors
    python convert.py ./gemma-3-1b-it-int4 ./gemma-3-1b-it-bf16 --to dense
    python convert.py ./gemma3-1b-it-int4-flax ./gemma-3-1b-it-int4 --to int4   # pip install .[flax]
    python convert.py google/gemma-3-1b-it ./gemma-3-1b-it-gptq --to int4 --quantizer gptq

The source format is detected: our int4 directory (gaunernst's layout), a dense HF directory, an AWQ or
compressed-tensors directory, a .gguf file, a Google Flax/Orbax checkpoint directory, a hub id, or gemma-3-270m
(the embedded default model). QAT weights (Google's Flax int4 checkpoints) come out lossless: each group's int4
grid is recovered exactly.
DST's directory must exist, and DST must not: the output is written under a temporary name and published at
the end without replacing anything (files.atomic_output), so a failed or interrupted conversion (Ctrl-C,
SIGTERM, a full disk) leaves neither a half-written DST nor its temporary.
"""

from gemma3_int4 import hugepages  # noqa: F401  (first: it configures torch's allocator, see hugepages.py)

# isort: split
import argparse
import sys
from pathlib import Path

from gemma3_int4 import checkpoint, files, hf_tokenizer, ptq
from gemma3_int4.cli import one_line_warnings
from gemma3_int4.config import Gemma3Config
from gemma3_int4.formats import gguf, hf, packed_int4
from gemma3_int4.loader import convert_weights, load_checkpoint
from gemma3_int4.tokenizer import Tokenizer

TARGETS = {
    "int4": "our int4 (gaunernst's safetensors layout; GGUF tensors above 4 bits stay 8-bit with --weights auto)",
    "gguf": "for llama.cpp: int4 -> Q4_0 (lossless), int8 -> Q8_0, the tokenizer in the metadata",
    "awq": "AutoAWQ's gemm layout for vLLM / SGLang / transformers: linears int4 (float zero points refitted with "
    "integer ones), int8 ones and the embedding bf16",
    "compressed-tensors": "W4A16 pack-quantized (group 32, zero points where needed) for vLLM: linears int4 (as "
    "awq), int8 ones and the embedding bf16",
    "dense": "bf16 safetensors as Google's checkpoints (int4 weights dequantized), for transformers or fine-tuning",
}
# Int4 with float zero points (a GGUF's Q4_K) goes to awq and compressed-tensors refitted with integer ones, each
# input column's error weighted by its inputs' mean square over these (sequences, tokens) of calibration text.
REFIT_CALIBRATION = (8, 512)


def convert(
    src: str | Path,
    dst: Path,
    to: str,
    weights: str = "auto",
    tokenizer: Path | None = None,
    quantizer: str = "rtn",
    calibration: Path | None = None,
) -> None:
    if to not in TARGETS:
        raise ValueError(f"unknown target format {to!r}: choose one of {', '.join(TARGETS)}")
    if quantizer not in ("rtn", "gptq") or (quantizer == "gptq" and to == "dense"):
        raise ValueError(f"quantizer {quantizer!r}: rtn or gptq, and gptq only for a quantized target")
    files.check_destination(dst)  # now, and again when the output is published (files.atomic_output)
    src = checkpoint.resolve(src)  # once: a hub id is looked up (downloaded) here, not for each file read below
    config, tensors, above_4_bits = load_checkpoint(src)  # the reader: the source's format (formats/)
    if tokenizer is not None:  # the source's tokenizer files would contradict it: carry none over
        proto, companions, template, stop_ids = tokenizer.read_bytes(), [], None, None
    else:
        proto, companions = checkpoint.tokenizer_proto(src), checkpoint.companion_files(src)
        template, stop_ids = checkpoint.chat_template(src), checkpoint.stop_ids(src)
    # not a tokenizer: fails before writing
    sentencepiece = Tokenizer(proto, str(tokenizer or "the source's tokenizer"), template, stop_ids)
    if sentencepiece.vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {sentencepiece.vocab_size} tokens, more than the model's {config.vocab_size}"
        )
    text = calibration.read_text() if calibration else None  # for GPTQ or the refit below (None: ptq's default)
    if quantizer == "gptq":  # every linear int4, from the dense (dequantized) weights
        ids = ptq.calibration_ids(sentencepiece, text)
        tensors = ptq.gptq(config, convert_weights(tensors, "dense", above_4_bits), ids)
    else:  # awq and compressed-tensors: integer zero points (the encoder refits float ones, writes int8 bf16)
        integer = to in hf.INT4_LAYOUTS
        tensors = convert_weights(tensors, "dense" if to == "dense" else weights, above_4_bits, True, integer)
    column_weights = None
    refit = packed_int4.float_zero_points(tensors) if to in hf.INT4_LAYOUTS else []
    if refit and isinstance(config, Gemma3Config):  # each refit weighed by its inputs (Gemma 4: not)
        ids = ptq.calibration_ids(sentencepiece, text, *REFIT_CALIBRATION)
        print(f"calibrating the refit of {len(refit)} weight(s) with integer zero points on {ids.shape[0]} x "
              f"{ids.shape[1]} tokens", file=sys.stderr)  # fmt: skip
        column_weights = ptq.input_mean_squares(config, tensors, ids)
    if to == "gguf":  # the writer, by --to: a GGUF file, the tokenizer and chat template in its metadata
        gguf.write(config, tensors, proto, dst, template)
    else:  # a safetensors directory, with what transformers, vLLM and SGLang read beside tokenizer.model
        tokenizer_files = hf_tokenizer.tokenizer_files(proto, template, checkpoint.adds_bos(src),
                                                       list(sentencepiece.stop_ids), config.max_seq_len)  # fmt: skip
        hf.write(config, tensors, proto, dst, to, companions, text_files=tokenizer_files, column_weights=column_weights)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory, .safetensors or .gguf file, hub id (owner/name), or "
                               f"{checkpoint.DEFAULT_MODEL}: the embedded default model")  # fmt: skip
    p.add_argument("dst", type=Path, help="output: a .gguf file, or a directory")
    p.add_argument("--to", required=True, choices=list(TARGETS),
                   help="; ".join(f"{k}: {v}" for k, v in TARGETS.items()))  # fmt: skip
    p.add_argument("--weights", choices=["auto", "int4"], default="auto",
                   help="auto: keep each tensor's precision (dense -> int4, GGUF above 4 bits -> 8 bits, which awq and "
                        "compressed-tensors write bf16); int4: every linear weight int4 (dense and "
                        "8-bit ones rounded symmetric) "
                        "(default auto)")  # fmt: skip
    p.add_argument("--quantizer", choices=["rtn", "gptq"], default="rtn",
                   help="how dense weights become int4. rtn: round to nearest, with zero points under --weights auto "
                        "(seconds); gptq: GPTQ calibrated on "
                        "--calibration, every linear int4 (minutes; far better on models not trained for int4). "
                        "Weights already on an int4 grid (QAT) stay exact either way (default rtn)")  # fmt: skip
    p.add_argument("--calibration", type=Path,
                   help="a text file to calibrate GPTQ on, or the awq / compressed-tensors refit of float zero "
                        "points (default: docstrings of Python's standard library); at least 64 x 511 tokens "
                        "(8 x 511 for the refit)")  # fmt: skip
    p.add_argument("--tokenizer", type=Path,
                   help="tokenizer.model to write (default: the source's own, or for an Orbax checkpoint the one "
                        "beside it)")  # fmt: skip
    args = p.parse_args(argv)
    files.handle_signals()  # SIGTERM and SIGHUP, like Ctrl-C: the temporary output is removed
    one_line_warnings()
    try:
        convert(args.src, args.dst, args.to, args.weights, args.tokenizer, args.quantizer, args.calibration)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, files.Terminated) as e:
        print(f"interrupted ({str(e) or 'SIGINT'}): {args.dst} not written", file=sys.stderr)
        return files.exit_code(e)
    print(f"wrote {args.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
