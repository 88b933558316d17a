"""Chat with Gemma 3 or 4: a multi-turn conversation in the terminal, each reply streamed as it is generated.

python chat.py --model gaunernst/gemma-3-4b-it-int4 --image cat.png
python chat.py --model google/gemma-4-E4B-it        # Gemma 4, text only (its template, turns, stop ids)
python chat.py --model gaunernst/gemma-3-1b-it-int4 --system "Answer in one sentence."
printf 'Hi!\\nWhat did I just say?\\n' | python chat.py --model gaunernst/gemma-3-1b-it-int4

Type a message and press Enter. Commands:
  /image PATH    attach an image to your next message (repeatable; Gemma 3 4B, 12B, 27B; Gemma 4)
  /audio PATH    attach a WAV recording to your next message (repeatable; Gemma 4 E2B, E4B)
  /system TEXT   set the system prompt and start a new conversation (/system alone shows it)
  /reset         start a new conversation
  /save FILE     save the conversation as JSON (a new file; /save! FILE may replace one)
  /help          show this help
  /exit          leave (or Ctrl-D)
Ctrl-C stops a reply and keeps what it said so far. A reply ends at --max-new-tokens (default 1024)
and says so. The KV cache is kept across turns, so each message costs only its own tokens. When the
conversation fills the context (--context tokens), chat.py says so: /reset starts over (/save first
to keep the transcript).
With stdin piped, each line is one message (commands too) and each reply is one block on stdout.
"""

from __future__ import annotations

from gemma3_int4 import hugepages  # noqa: F401  (first: it configures torch's allocator, see hugepages.py)

# isort: split
import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from gemma3_int4 import files, gemma4_audio, vision
from gemma3_int4.cli import (
    REPLY_LIMIT,
    add_model_arguments,
    add_sampling_arguments,
    load,
    note_if_base_model,
    one_line_warnings,
    positive_int,
    sampling_from,
)
from gemma3_int4.config import BOS_ID, GEMMA4_START_OF_AUDIO_ID, START_OF_IMAGE_ID
from gemma3_int4.generation import Sampling, audio_inputs, compile_decode_step, decode_one_token, generate, image_inputs
from gemma3_int4.model import Gemma3
from gemma3_int4.tokenizer import StreamDecoder, Tokenizer

HELP = __doc__[__doc__.index("Commands:") : __doc__.index("Ctrl-C")].rstrip()


class ContextFull(Exception):
    pass


class Conversation:
    """A chat whose KV cache lives across turns.

    `ids` is the transcript as tokens (what the model has seen and said) and `cached` how many of them
    the KV cache holds; a new message prefills only ids[cached:] plus its own tokens. Replies are kept
    as the tokens generated, never re-tokenized, so the cache and the transcript always agree.
    """

    def __init__(
        self,
        model: Gemma3,
        tokenizer: Tokenizer,
        sampling: Sampling,
        context: int,
        system: str | None = None,
        max_new_tokens: int | None = None,
        generator: torch.Generator | None = None,
        decode_step=decode_one_token,
    ):
        self.model, self.tokenizer, self.sampling, self.generator = model, tokenizer, sampling, generator
        self.system, self.max_new_tokens, self.decode_step = system, max_new_tokens, decode_step
        # (path, "image" or "audio", pixel values or log-mel features, soft tokens) for the next message
        self.attached: list[tuple[str, str, torch.Tensor, int]] = []
        self.finish: str | None = None  # how the last reply ended: "stop" (a stop id), "length" or None
        model.setup_cache(1, context)
        self.reset()

    @property
    def context(self) -> int:
        return self.model.cache_len

    def reset(self) -> None:
        self.messages: list[dict] = []  # {"role", "content", "images": [paths], "audio": [paths] if any}, for /save
        self.ids: list[int] = []
        self.media: dict[str, list[torch.Tensor]] = {"image": [], "audio": []}  # every one of the transcript
        self.cached = 0  # a new sequence starts at position 0; the cache forgets the old one (model.hidden_states)

    def attach(self, path: str, kind: str = "image") -> None:
        """Read and preprocess an image (or a recording, kind "audio") for the next message: a bad file fails
        here, before anything is sent."""
        if kind == "audio":
            if getattr(self.model, "audio", None) is None:
                raise ValueError("this model has no audio tower: audio needs Gemma 4 E2B or E4B")
            features, counts = audio_inputs([gemma4_audio.load_audio(path)])
        elif self.model.vision is None:
            raise ValueError("this model is text-only: images need Gemma 3 4B, 12B or 27B, or Gemma 4's vision tower")
        else:
            features, counts = image_inputs(self.model, [vision.load_image(path)])
        self.attached.append((str(path), kind, features[0], counts[0]))

    def ask(self, text: str) -> Iterator[str]:
        """Send a user message (with the attached images and recordings) and stream the reply as text. Raises
        ContextFull, before changing anything, if the message leaves no room for a reply. If the caller stops
        early (Ctrl-C), the reply so far is kept and its turn closed."""
        counts = {kind: [n for _, k, _, n in self.attached if k == kind] for kind in self.media}
        first = not self.ids
        system = self.system if first else None
        message = self.tokenizer.turn("user", text, len(counts["image"]), system, counts["image"], counts["audio"])
        prompt = self.ids + [BOS_ID] * first + message + self.tokenizer.model_turn()
        if len(prompt) >= self.context:
            raise ContextFull(
                f"context full: this message would bring the conversation to {len(prompt)} tokens, and the "
                f"context holds {self.context}. /reset starts a new conversation (/save first to keep this one)."
            )
        paths = {kind: [path for path, k, _, _ in self.attached if k == kind] for kind in self.media}
        for _, kind, media, _ in self.attached:
            self.media[kind].append(media)
        self.messages.append({"role": "user", "content": text, "images": paths["image"]})
        if paths["audio"]:
            self.messages[-1]["audio"] = paths["audio"]
        self.attached = []
        start = self.cached  # the media of the messages the cache holds are there already
        new_images = self.media["image"][self.ids[:start].count(START_OF_IMAGE_ID) :]
        new_audio = self.media["audio"][self.ids[:start].count(GEMMA4_START_OF_AUDIO_ID) :]  # (Gemma 4's)
        if isinstance(self.model, Gemma3):  # Gemma 3's images stacked; Gemma 4's media a list
            pixel_values = torch.stack(new_images) if new_images else None
        else:
            pixel_values = new_images + new_audio or None
        room = self.context - len(prompt)
        limit = min(room, self.max_new_tokens or room)
        reply, stream = [], StreamDecoder(self.tokenizer)
        try:
            for token in generate(
                self.model, prompt, limit, self.sampling, self.tokenizer.stop_ids,
                self.generator, self.decode_step, pixel_values, start,
            ):  # fmt: skip
                reply.append(token)
                if token not in self.tokenizer.stop_ids:
                    yield stream.push(token)
        finally:  # finished, cut at max_new_tokens or the context's end, or interrupted: close the turn
            stopped = bool(reply) and reply[-1] in self.tokenizer.stop_ids
            said = reply[:-1] if stopped else reply
            self.finish = "stop" if stopped else "length" if len(reply) == limit else None  # None: interrupted
            self.messages.append({"role": "model", "content": stream.text, "images": []})  # as printed
            # the cache holds the prompt and every reply token but the last sampled (never fed back); after an
            # interrupted prefill nothing is sure (a ring buffer cannot rewind), so the next turn starts over
            self.cached = len(prompt) + len(reply) - 1 if reply else 0
            self.ids = prompt + said + [self.tokenizer.end_of_turn] + self.tokenizer.encode("\n")

    def reply_was_cut(self) -> bool:
        """Whether the last reply ran into the end of the context."""
        return len(self.ids) >= self.context

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """The transcript as JSON, written atomically; an existing file is replaced only with overwrite."""
        with files.atomic_output(Path(path).expanduser(), overwrite) as tmp:
            tmp.write_text(json.dumps({"system": self.system, "messages": self.messages}, indent=2, ensure_ascii=False))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt (Gemma prepends it to the first message)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the first message (repeatable), like /image")  # fmt: skip
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="a WAV recording for the first message (repeatable), like /audio")  # fmt: skip
    p.add_argument("--context", type=positive_int, default=8192,
                   help="tokens the conversation may hold (KV cache; default 8192, at most the model's)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=positive_int, default=REPLY_LIMIT,
                   help=f"longest reply in tokens, at most the context; a reply cut there says so (default "
                        f"{REPLY_LIMIT}: raise it for long answers)")  # fmt: skip
    add_sampling_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    files.handle_signals()  # SIGTERM, SIGHUP: leave like Ctrl-D, cleaning up (a first run's conversion too)
    one_line_warnings()
    try:
        return run(args)
    except files.Terminated as e:
        print(f"({e})", file=sys.stderr)
        return e.exit_code


def run(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 is refused (Tokenizer), not fatal
    try:
        model, tokenizer = load(args)
        device = torch.device(args.device)
        generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
        step = compile_decode_step(device, model) if args.compile else decode_one_token
        context = min(args.context, model.config.max_seq_len)
        chat = Conversation(model, tokenizer, sampling_from(args), context, args.system, args.max_new_tokens,
                            generator, step)  # fmt: skip
        for path in args.image:  # a bad --image or --audio fails now, not at the first message
            chat.attach(path)
        for path in args.audio:
            chat.attach(path, "audio")
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    note_if_base_model(args, tokenizer)
    if interactive:
        setup_readline()
        print(f"chatting with {args.model} ({context} tokens of context). /help for commands, Ctrl-D to leave.",
              file=sys.stderr)  # fmt: skip
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # at the prompt: like Python's REPL, a fresh line
            if not interactive:
                return 130
            print("\n(/exit or Ctrl-D to leave)", file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if command(chat, line) == "exit":
                return 0
            continue
        reply(chat, line)


def command(chat: Conversation, line: str) -> str | None:
    """Run a /command; "exit" to leave."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return "exit"
    if name == "/help":
        print(HELP, file=sys.stderr)
    elif name == "/reset":
        chat.reset()
        chat.attached.clear()
        print("(new conversation)", file=sys.stderr)
    elif name == "/system":
        if not arg:
            print(f"(system prompt: {chat.system!r})", file=sys.stderr)
            return None
        chat.system = arg
        chat.reset()
        print("(system prompt set; new conversation)", file=sys.stderr)
    elif name in ("/image", "/audio"):
        if not arg:
            print(f"usage: {name} PATH", file=sys.stderr)
            return None
        try:
            chat.attach(arg, name[1:])  # a bad path is reported now, and the chat goes on
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return None
        print(f"({name[1:]} {arg} attached to your next message)", file=sys.stderr)
    elif name in ("/save", "/save!"):
        if not arg:
            print("usage: /save FILE (or /save! FILE to replace an existing file)", file=sys.stderr)
            return None
        try:
            chat.save(arg, overwrite=name == "/save!")
            print(f"(saved to {arg})", file=sys.stderr)
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
    else:
        print(f"unknown command {name}; /help lists them", file=sys.stderr)
    return None


def reply(chat: Conversation, text: str) -> None:
    """Stream the reply to one message (a message that is not sent keeps its attached images)."""
    stream = chat.ask(text)
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ContextFull as e:
        print(str(e), file=sys.stderr)
        return
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return
    except KeyboardInterrupt:
        stream.close()
        sys.stdout.write("\n")
        print("(stopped)", file=sys.stderr)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    if chat.reply_was_cut():
        print("(the context is full: /reset starts a new conversation)", file=sys.stderr)
    elif chat.finish == "length":
        print(f"(reply cut at {chat.max_new_tokens} tokens: --max-new-tokens sets the limit)", file=sys.stderr)


def setup_readline() -> None:
    """Line editing and a history kept between sessions, when stdin is a terminal."""
    try:
        import atexit
        import readline
    except ImportError:  # not on every platform
        return
    history = files.cache_dir() / "chat_history"
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)
    atexit.register(lambda: readline.write_history_file(history))


if __name__ == "__main__":
    sys.exit(main())
