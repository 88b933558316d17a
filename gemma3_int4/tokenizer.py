"""Gemma's SentencePiece tokenizer, its special tokens, the chat template and streaming decode."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import sentencepiece as spm

from . import checkpoint
from .config import (
    BOS_ID,
    END_OF_IMAGE_ID,
    EOS_ID,
    GEMMA4_AUDIO_TOKEN_ID,
    GEMMA4_END_OF_AUDIO_ID,
    GEMMA4_END_OF_IMAGE_ID,
    GEMMA4_IMAGE_TOKEN_ID,
    GEMMA4_START_OF_AUDIO_ID,
    GEMMA4_START_OF_IMAGE_ID,
    IMAGE_TOKEN_ID,
    START_OF_IMAGE_ID,
)

IMAGE_MARK = "<start_of_image>"  # in a prompt, where an image goes (as in transformers' Gemma3Processor; Gemma 4 too)
AUDIO_MARK = "<start_of_audio>"  # where a recording goes (Gemma 4 E2B, E4B)
MEDIA_MARKS = re.compile(f"({IMAGE_MARK}|{AUDIO_MARK})")
TokensPerImage = int | list[int]  # soft tokens per image: Gemma 3's one number, Gemma 4's a number for each image
# an image's opening, soft and closing tokens
GEMMA3_IMAGE_IDS = (START_OF_IMAGE_ID, IMAGE_TOKEN_ID, END_OF_IMAGE_ID)
GEMMA4_IMAGE_IDS = (GEMMA4_START_OF_IMAGE_ID, GEMMA4_IMAGE_TOKEN_ID, GEMMA4_END_OF_IMAGE_ID)
GEMMA4_AUDIO_IDS = (GEMMA4_START_OF_AUDIO_ID, GEMMA4_AUDIO_TOKEN_ID, GEMMA4_END_OF_AUDIO_ID)
GEMMA3_TURN, GEMMA4_TURN = ("<start_of_turn>", "<end_of_turn>"), ("<|turn>", "<turn|>")  # a turn's bounds


class Tokenizer:
    def __init__(
        self, proto: bytes, source: str = "tokenizer", chat_template: str | None = None, stop_ids: list | None = None
    ):
        """proto: a serialized SentencePiece model (the bytes of a tokenizer.model). chat_template (the
        checkpoint's) tells how a reply opens (generation_prompt); stop_ids, the checkpoint's, end a reply
        (default: <eos> and the end of a turn; Gemma 4's also a tool response). A vocabulary with Gemma 4's
        turn tokens chats as Gemma 4."""
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{source}: not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.gemma4 = self.sp.piece_to_id(GEMMA4_TURN[0]) != self.sp.unk_id()
        start, end = GEMMA4_TURN if self.gemma4 else GEMMA3_TURN
        self.start_of_turn, self.end_of_turn = self.sp.piece_to_id(start), self.sp.piece_to_id(end)
        tool_response = self.sp.piece_to_id("<|tool_response>")  # Gemma 4's stop token too, as Google lists them
        tool_response = [tool_response] if self.gemma4 and 0 <= tool_response != self.sp.unk_id() else []
        self.stop_ids = tuple(stop_ids or (EOS_ID, self.end_of_turn, *tool_response))
        self.chat_template = chat_template
        self.reply_opening = generation_prompt(chat_template, source) or f"{start}model\n"

    @classmethod
    def from_file(cls, model_file: str | Path) -> Tokenizer:
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"tokenizer not found: {model_file}")
        return cls(model_file.read_bytes(), str(model_file))

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path) -> Tokenizer:
        """A GGUF's own tokenizer, else the tokenizer.model (or tokenizer.json) of a checkpoint directory (or beside
        a file), with the checkpoint's chat template and stop ids where it has them."""
        path = checkpoint.resolve(path_or_hub_id)  # once: a hub id is looked up here, not for each file
        proto, template = checkpoint.tokenizer_proto(path), checkpoint.chat_template(path)
        return cls(proto, str(path_or_hub_id), template, checkpoint.stop_ids(path))

    def encode(
        self,
        text: str,
        bos: bool = False,
        num_images: int = 0,
        tokens_per_image: TokensPerImage = 256,
        audio_tokens: list[int] = (),
    ) -> list[int]:
        """Text -> ids. With num_images, the text marks where each image goes with "<start_of_image>" (see
        place_images); each becomes "\\n\\n<start_of_image>" + tokens_per_image soft tokens + "<end_of_image>\\n\\n",
        as transformers' Gemma3Processor expands it (the model puts the image's features at the soft tokens);
        Gemma 4's, "<|image>" + its soft tokens "<|image|>" + "<image|>", as its Gemma4Processor does. audio_tokens:
        each recording's soft-token count; the text marks each with "<start_of_audio>", which becomes "<|audio>"
        + its soft tokens "<|audio|>" + "<audio|>"."""
        check_text(text)
        ids = [BOS_ID] * bos
        if not num_images and not audio_tokens:
            return ids + self.plain(text)
        pieces = MEDIA_MARKS.split(text)  # text, mark, text, mark, ..., text
        for mark, count in ((IMAGE_MARK, num_images), (AUDIO_MARK, len(audio_tokens))):
            if pieces[1::2].count(mark) != count:
                what = "image" if mark == IMAGE_MARK else "audio"
                raise ValueError(f"the prompt marks {pieces[1::2].count(mark)} {what} place(s) with {mark} for {count}")
        counts = tokens_per_image if isinstance(tokens_per_image, list) else [tokens_per_image] * num_images
        image, audio = GEMMA4_IMAGE_IDS if self.gemma4 else GEMMA3_IMAGE_IDS, GEMMA4_AUDIO_IDS
        counts, audio_counts = iter(counts), iter(audio_tokens)
        gap = "" if self.gemma4 else "\n\n"
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids += self.plain((gap if i else "") + piece + ("" if i == len(pieces) - 1 else gap))
                continue
            start, soft, end = image if piece == IMAGE_MARK else audio
            ids += [start, *[soft] * next(counts if piece == IMAGE_MARK else audio_counts), end]
        return ids

    def plain(self, text: str) -> list[int]:
        """Text -> ids, where the image control tokens' names typed in the text stay text: SentencePiece would
        match them (user-defined pieces), but only an image may put them into a prompt (encode)."""
        ids = []
        for i, part in enumerate(IMAGE_CONTROLS.split(text)):
            ids += self.sp.encode(part) if i % 2 == 0 else self.sp.encode(part[:1]) + self.sp.encode(part[1:])
        return ids

    def decode(self, ids: list[int]) -> str:
        """Ids -> text; ids past the tokenizer's pieces (image soft tokens, vocabulary padding) decode to nothing."""
        return self.sp.decode([i for i in ids if i < self.vocab_size])

    def chat_prompt(
        self, messages: list[dict], system: str | None = None, tokens_per_image: TokensPerImage = 256
    ) -> list[int]:
        """Gemma's chat template, ending with the opened model turn:
        <bos><start_of_turn>user\\n{system}\\n\\n{message}<end_of_turn>\\n<start_of_turn>model\\n ...
        Gemma 4's: <bos><|turn>system\\n{system}<turn|>\\n<|turn>user\\n{message}<turn|>\\n<|turn>model\\n ...

        messages: [{"role": "user" | "model", "content": str, "images": int (optional, default 0),
        "audio": [soft tokens of each recording] (optional, Gemma 4)}, ...].
        Gemma 3 has no system role: the system prompt is prepended to the first user message. tokens_per_image:
        a list gives each image of the conversation, in order, its own count (Gemma 4).
        """
        ids = [BOS_ID]
        counts = tokens_per_image if isinstance(tokens_per_image, list) else None
        for i, m in enumerate(messages):
            n = m.get("images", 0)
            mine = tokens_per_image if counts is None else counts[:n]
            counts = None if counts is None else counts[n:]
            ids += self.turn(m["role"], m["content"], n, system if i == 0 else None, mine, m.get("audio", ()))
        return ids + self.model_turn()

    def turn(
        self,
        role: str,
        content: str,
        num_images: int = 0,
        system: str | None = None,
        tokens_per_image: TokensPerImage = 256,
        audio_tokens: list[int] = (),
    ) -> list[int]:
        """One closed turn, "<start_of_turn>{role}\\n{system}\\n\\n{content}<end_of_turn>\\n". The images go where
        the content marks them, else before it (place_images). Special tokens are inserted by id, so text
        that happens to contain "<start_of_turn>" stays plain text. Gemma 4's turns hold their content
        stripped, as its template does, and a system prompt is a turn of its own before this one."""
        if role not in ("user", "model"):
            raise ValueError(f"chat role must be 'user' or 'model', not {role!r}")
        check_text(content)  # here, so that an error counts characters of the content as given
        if self.gemma4:
            opening = self.turn_tokens("system", system.strip()) if system else []
            if not num_images and not audio_tokens:
                return opening + self.turn_tokens(role, content.strip())
            text = place_images(content.strip(), num_images, len(audio_tokens))
            body = self.encode(f"{role}\n{text}", False, num_images, tokens_per_image, audio_tokens)
            return opening + [self.start_of_turn, *body, self.end_of_turn, *self.encode("\n")]
        text = place_images(content, num_images)
        text = f"{system}\n\n{text}" if system else text
        body = self.encode(f"{role}\n{text}", num_images=num_images, tokens_per_image=tokens_per_image)
        return [self.start_of_turn, *body, self.end_of_turn, *self.encode("\n")]

    def turn_tokens(self, role: str, text: str) -> list[int]:
        return [self.start_of_turn, *self.plain(f"{role}\n{text}"), self.end_of_turn, *self.encode("\n")]

    def model_turn(self) -> list[int]:
        """The opened model turn that a reply continues, as the checkpoint's template opens it (generation_prompt):
        "<start_of_turn>model\\n", Gemma 4's "<|turn>model\\n" (some with an empty thought channel after it)."""
        ids = []
        for i, part in enumerate(SPECIAL_NAME.split(self.reply_opening)):
            special = self.sp.piece_to_id(part) if i % 2 else self.sp.unk_id()
            ids += [special] if special != self.sp.unk_id() else self.plain(part)
        return ids


# as split by Tokenizer.plain: Gemma 3's image bounds, Gemma 4's image and audio bounds and soft tokens
IMAGE_CONTROLS = re.compile(
    r"(<start_of_image>|<end_of_image>|<\|image>|<\|image\|>|<image\|>|<\|audio>|<\|audio\|>|<audio\|>)"
)
SPECIAL_NAME = re.compile(r"(<[^<>\s]+>)")  # how a template writes a special token: <|turn>, <start_of_turn>, ...


def generation_prompt(template: str | None, source: str = "tokenizer") -> str | None:
    """What a chat template appends to open the model's reply (add_generation_prompt), rendered as transformers
    renders templates (a sandboxed Jinja environment); None without a template, or where it does not render."""
    if not template:
        return None
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    messages = [{"role": "user", "content": "Hi"}]
    try:
        compiled = env.from_string(template)
        texts = [compiled.render(messages=messages, add_generation_prompt=add, bos_token="<bos>") for add in (0, 1)]
    except Exception as e:  # a template is a program: whatever it raises, replies open the model's turn plainly
        warnings.warn(f"{source}: the chat template does not render ({type(e).__name__}: {e})", stacklevel=2)
        return None
    closed, opened = texts
    return opened[len(closed) :] if opened.startswith(closed) and len(opened) > len(closed) else None


def check_text(text: str) -> None:
    """A ValueError for text that is not Unicode: bytes that did not decode (Python keeps them as lone
    surrogates, in command-line arguments and in stdin read with errors="surrogateescape")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"the lone surrogate U+{code:04X}"
        raise ValueError(f"the text is not valid UTF-8: {what} at character {e.start}") from None


def place_images(text: str, num_images: int, num_audio: int = 0) -> str:
    """The text with a "<start_of_image>" mark per image: its own marks if it has any, else all the images
    before the text (where transformers' chat template puts them); and so for recordings, "<start_of_audio>"."""
    if num_audio and AUDIO_MARK not in text:
        text = AUDIO_MARK * num_audio + text
    if num_images and IMAGE_MARK not in text:
        text = IMAGE_MARK * num_images + text
    return text


def is_instruction_tuned(name: str | Path) -> bool:
    """Gemma's instruction-tuned checkpoints are named *-it (gemma-3-4b-it, gemma-3-1b-it-int4, ...)."""
    return re.search(r"(^|[-_./])(it|instruct)([-_./]|$)", Path(name).name, re.IGNORECASE) is not None


def is_base_model(name: str | Path, chat_template: str | None) -> bool:
    """Whether a checkpoint is a pretrained (base) model, which continues text rather than answering, as far as its
    name and files tell: Google names tuned models *-it and base ones gemma-N-SIZE or *-pt; a name that follows
    neither convention (a fine-tune's) counts as tuned when the checkpoint carries a chat template."""
    stem = Path(name).name
    if is_instruction_tuned(stem):
        return False
    if re.search(r"(^|[-_.])(pt|base)([-_.]|$)", stem, re.IGNORECASE) or re.match(r"gemma-?\d", stem, re.IGNORECASE):
        return True
    return chat_template is None


# Ids of left context that StreamDecoder decodes before the new ones: SentencePiece strips the leading space of
# a text's first piece (in models with a dummy prefix), so a window's new ids must not come first.
CONTEXT_IDS = 4


class StreamDecoder:
    """Turns generated ids into text as it becomes printable: a multi-byte character split over
    byte-fallback tokens waits for its last byte, and leading spaces of pieces are kept.

    Each push decodes only the ids whose text may still change (those since the text last settled, after a
    few of context), so a reply costs time linear in its length; the text is the same as decoding all the ids
    on every push would give: SentencePiece decodes piece by piece, except that a run of byte pieces decodes
    as one UTF-8 string."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # up to CONTEXT_IDS settled ids, then those whose text may still change
        self.context = ""  # the text of the settled ones
        self.unsent = ""  # settled text held back: it ends in a replacement character (see push)
        self.printed: list[str] = []  # the text returned so far, piece by piece

    @property
    def text(self) -> str:
        """The text returned so far."""
        return "".join(self.printed)

    def push(self, token_id: int) -> str:
        """Add one token; return the new printable text (possibly ""). Text that ends in U+FFFD (what the first
        bytes of a multi-byte character decode to until its last one comes) is held back until more follows."""
        if token_id >= self.tokenizer.vocab_size:
            return ""  # decodes to nothing (Tokenizer.decode), and the byte pieces either side of it still join
        self.ids.append(token_id)
        new = self.tokenizer.decode(self.ids)[len(self.context) :]
        if new.endswith("\ufffd") and self.tokenizer.sp.is_byte(token_id):
            return ""  # a character's first bytes: the next byte pieces may complete it
        self.settle(new)
        if self.unsent.endswith("\ufffd"):  # final (an invalid byte, or a piece's), but held back all the same:
            return ""  # what is printed never ends in U+FFFD
        text, self.unsent = self.unsent, ""
        self.printed.append(text)
        return text

    def settle(self, text: str) -> None:
        """The text so far is final: later ids cannot change it, after a piece that is not a byte or after
        bytes that made a whole character. Only a few ids stay, as context."""
        self.unsent += text
        self.ids = self.ids[-CONTEXT_IDS:]
        self.context = self.tokenizer.decode(self.ids)
