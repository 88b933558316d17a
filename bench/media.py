"""Time to first token of an image prompt and of a 10-second audio prompt, on Gemma 4 in the published shapes.

    python bench/media.py                  # E2B: random int4 language model, random bf16 towers
    python bench/media.py --size e4b --work /tmp/g4

The benchmark builds the checkpoint (bench/speed.py's random weights, with the vision and audio towers in their
published shapes, bf16 as the checkpoints keep them; never kept in the repository), then in one process:
  load s           loading it (a second, warm load: the files in the page cache)
  image TTFT s     a 640x480 photo (280 soft tokens) and a short question: preprocessing, the vision tower and
                   the prefill, to the first new token; tower s: the tower and its embedder alone
  audio TTFT s     10 s of audio (250 soft tokens): log-mel features, the audio tower and the prefill, likewise
  peak MB          the process's peak resident memory
Each is run once untimed first. The checkpoint is built in a subprocess of its own (its memory is not counted).
Writes media-<size>.json under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gemma3_int4 import hugepages  # noqa: E402, F401  (before torch: see hugepages.py)

# isort: split
from speed import peak_rss_mb, random_int4_checkpoint  # noqa: E402


def first_token_s(model, prompt: list[int], media: list) -> float:
    from gemma3_int4.generation import Sampling, generate

    t0 = time.perf_counter()
    next(iter(generate(model, prompt, 1, Sampling(temperature=0), pixel_values=media)))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="e2b", choices=["e2b", "e4b"])
    p.add_argument("--work", type=Path, help="keep the random checkpoint here (default: temporary)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the subprocess that builds the checkpoint
    args = p.parse_args()
    if args.build:
        return random_int4_checkpoint(args.size, args.build, towers=True)

    import numpy as np
    import torch
    from PIL import Image

    from gemma3_int4 import gemma4_audio, loader
    from gemma3_int4.config import BOS_ID
    from gemma3_int4.generation import audio_inputs, image_inputs
    from gemma3_int4.tokenizer import GEMMA4_AUDIO_IDS, GEMMA4_IMAGE_IDS, Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp())
    directory = work / f"gemma-4-{args.size}-random-int4-towers"
    if not directory.exists():
        print(f"building random {args.size} weights with towers in {directory}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--size", args.size, "--build", directory], check=True)  # own peak
    loader.from_pretrained(directory)  # cold: reads the files into the page cache
    t0 = time.perf_counter()
    model = loader.from_pretrained(directory)
    load_s = time.perf_counter() - t0
    tokenizer = Tokenizer.from_pretrained(directory)

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    t = np.arange(10 * gemma4_audio.SAMPLE_RATE) / gemma4_audio.SAMPLE_RATE
    recording = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)

    def with_media(ids: tuple[int, int, int], count: int, text: str) -> list[int]:
        """Gemma 4's media tokens put in by id: the checkpoint has the 270M's tokenizer, whose ids are Gemma 3's."""
        start, soft, end = ids
        return [BOS_ID, start, *[soft] * count, end, *tokenizer.encode(text)]

    def image_prompt():
        pixels, counts = image_inputs(model, [photo])
        return with_media(GEMMA4_IMAGE_IDS, counts[0], " What is in this image?"), pixels

    def audio_prompt():
        features, counts = audio_inputs([recording])
        return with_media(GEMMA4_AUDIO_IDS, counts[0], " What is said?"), features

    result = {"size": args.size, "device": "cpu", "threads": torch.get_num_threads(), "load_s": round(load_s, 2)}
    for name, make in (("image", image_prompt), ("audio", audio_prompt)):
        prompt, media = make()
        first_token_s(model, prompt, media)  # warm-up
        t0 = time.perf_counter()
        prompt, media = make()
        ttft = time.perf_counter() - t0 + first_token_s(model, prompt, media)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.media_embeddings(torch.tensor([prompt]), media)
        tower_s = time.perf_counter() - t0
        result[name] = {"prompt_tokens": len(prompt), "ttft_s": round(ttft, 2), "tower_s": round(tower_s, 2)}
        print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
    result["peak_mb"] = peak_rss_mb()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"media-{args.size}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
