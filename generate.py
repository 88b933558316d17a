"""Generate text with Gemma 3 (or Gemma 4's text models), streaming the continuation to stdout.

python generate.py --model gaunernst/gemma-3-1b-it-int4 --prompt "Why is the sky blue?"
python generate.py --model gaunernst/gemma-3-4b-it-int4 --image cat.png --prompt "What is in this image?"
python generate.py --model gaunernst/gemma-3-4b-it-int4 --image a.png --image b.png \
    --prompt "Compare <start_of_image> with <start_of_image>."

Images (Gemma 3 4B, 12B, 27B; Gemma 4 checkpoints with their vision tower) go before the prompt text, or
where the prompt marks them with <start_of_image>, one mark per --image, in order; recordings (--audio, WAV;
Gemma 4 E2B, E4B) likewise, marked with <start_of_audio>.

Several prompts (--prompt repeated, or --prompt-file with one prompt per line) are generated together,
--max-batch at a time, each at its own position in one batched decode step; each reply is printed as a
JSON line {"index", "prompt", "text", "finish_reason", "new_tokens"} when it finishes.
"""

from gemma3_int4 import hugepages  # noqa: F401  (first: it configures torch's allocator, see hugepages.py)

# isort: split
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gemma3_int4 import files, gemma4_audio, vision
from gemma3_int4.cli import (
    add_model_arguments,
    add_sampling_arguments,
    load,
    one_line_warnings,
    positive_int,
    sampling_from,
)
from gemma3_int4.generation import (
    Request,
    audio_inputs,
    compile_decode_step,
    decode_one_token,
    generate,
    generate_batch,
    image_inputs,
)
from gemma3_int4.tokenizer import StreamDecoder, check_text, is_instruction_tuned, place_images


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", default=[], help="the prompt text (repeatable: several prompts)")
    p.add_argument("--prompt-file", metavar="PATH", help="a text file of prompts, one per line (blank lines skipped)")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="several prompts: how many decode together, one batch row each (default 8)")  # fmt: skip
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the prompt (repeatable; Gemma 3 4B, 12B, 27B; Gemma 4)")  # fmt: skip
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="a WAV recording for the prompt (repeatable; Gemma 4 E2B, E4B)")  # fmt: skip
    add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=256,
                   help="stop after this many new tokens (default 256)")  # fmt: skip
    add_sampling_arguments(p)
    p.add_argument("--raw", action="store_true", help="feed the prompt as is (after <bos>), no chat template")
    p.add_argument("--chat", action="store_true", help="apply the chat template even if the name lacks '-it'")
    p.add_argument("--stats-json", action="store_true", help="print timing stats as JSON, last line of stderr")
    args = p.parse_args(argv)
    if args.prompt_file is not None:
        try:
            lines = Path(args.prompt_file).read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        except OSError as e:
            p.error(f"--prompt-file: {e.strerror}: {args.prompt_file}")
        args.prompt += [line for line in lines if line.strip()]
    if not args.prompt:
        p.error("give a prompt: --prompt TEXT (repeatable) or --prompt-file PATH")
    if len(args.prompt) > 1 and (args.image or args.audio):
        p.error(f"{'--image' if args.image else '--audio'} goes with a single prompt")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    files.handle_signals()  # SIGTERM, SIGHUP: like Ctrl-C, so that a first run's conversion cleans up
    one_line_warnings()
    try:
        return run(args)
    except (KeyboardInterrupt, files.Terminated) as e:  # Ctrl-C: stop cleanly, whatever was running
        print(f"\n[interrupted{f' by {e}' if str(e) else ''}]", file=sys.stderr)
        return files.exit_code(e)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    try:
        sampling = sampling_from(args)
        for text in args.prompt:
            check_text(text)  # before the slow load
        images = [vision.load_image(path) for path in args.image]  # bad images and audio fail before the slow load
        recordings = [gemma4_audio.load_audio(path) for path in args.audio]
        t0 = time.perf_counter()
        model, tokenizer = load(args)
        if images and model.vision is None:
            raise ValueError(f"--image: {args.model} is a text-only model (images need Gemma 3 4B, 12B or 27B, "
                             "or a Gemma 4 checkpoint with its vision tower)")  # fmt: skip
        load_s = time.perf_counter() - t0
        if recordings and model.audio is None:
            raise ValueError(f"--audio: {args.model} has no audio tower (audio needs Gemma 4 E2B or E4B)")
        pixel_values, tokens_per_image = image_inputs(model, images) if images else (None, 0)
        features, audio_tokens = audio_inputs(recordings)
        if features:  # Gemma 4's media: its images (a list) and recordings, each kind in order
            pixel_values = [*(pixel_values or []), *features]
        use_chat = args.chat or (is_instruction_tuned(args.model) and not args.raw)
        prompts = []
        for text in args.prompt:
            if use_chat:
                message = {"role": "user", "content": text, "images": len(images), "audio": audio_tokens}
                prompts.append(tokenizer.chat_prompt([message], tokens_per_image=tokens_per_image))
            else:
                text = place_images(text, len(images), len(recordings))
                prompts.append(tokenizer.encode(text, True, len(images), tokens_per_image, audio_tokens))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    step = compile_decode_step(device, model) if args.compile else decode_one_token
    if len(prompts) > 1:
        return run_batch(args, model, tokenizer, prompts, sampling, generator, step, load_s)
    prompt = prompts[0]

    stream, new_tokens = StreamDecoder(tokenizer), 0
    t_start = t_first = t_second = time.perf_counter()
    try:
        tokens = generate(
            model, prompt, args.max_new_tokens, sampling, tokenizer.stop_ids, generator, step, pixel_values
        )
        for token in tokens:
            if new_tokens == 0:
                t_first = time.perf_counter()
            elif new_tokens == 1:  # the first decode step is where --compile compiles: time the steps after it
                t_second = time.perf_counter()
            new_tokens += 1
            if token not in tokenizer.stop_ids:
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


def run_batch(args, model, tokenizer, prompts, sampling, generator, step, load_s: float) -> int:
    """Several prompts, --max-batch rows at a time; each reply a JSON line on stdout as it finishes."""
    context = min(model.config.max_seq_len, max(map(len, prompts)) + args.max_new_tokens)
    requests = [Request(prompt, args.max_new_tokens, sampling, tokenizer.stop_ids, generator) for prompt in prompts]
    t0 = time.perf_counter()
    try:
        rows = min(args.max_batch, len(prompts))
        for request in generate_batch(model, requests, rows, context, step, every_row=args.compile):
            index = requests.index(request)
            said = request.tokens[:-1] if request.finish_reason == "stop" else request.tokens
            reply = {"index": index, "prompt": args.prompt[index], "text": tokenizer.decode(said),
                     "finish_reason": request.finish_reason, "new_tokens": len(request.tokens)}  # fmt: skip
            print(json.dumps(reply, ensure_ascii=False), flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    new_tokens, seconds = sum(len(r.tokens) for r in requests), time.perf_counter() - t0
    peak_mb = round(peak_memory_mb(model.norm.weight.device), 1)
    stats = {"prompts": len(prompts), "rows": rows, "new_tokens": new_tokens, "load_s": round(load_s, 3),
             "tok_s": round(new_tokens / seconds, 2), "peak_mem_mb": peak_mb}  # fmt: skip
    print(f"[{len(prompts)} prompts, {rows} at a time: {new_tokens} new tokens at {stats['tok_s']} tok/s in all, "
          f"loaded in {stats['load_s']} s, peak memory {stats['peak_mem_mb']} MB]", file=sys.stderr)  # fmt: skip
    if args.stats_json:
        print(json.dumps(stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
