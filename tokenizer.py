"""Gemma's SentencePiece tokenizer, its special tokens, the chat template and streaming decode."""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

import checkpoint
from config import BOS_ID, END_OF_IMAGE_ID, END_OF_TURN_ID, IMAGE_TOKEN_ID, START_OF_IMAGE_ID, START_OF_TURN_ID

IMAGE_MARK = "<start_of_image>"  # in a prompt, where an image goes (as in transformers' Gemma3Processor)


class Tokenizer:
    def __init__(self, proto: bytes, source: str = "tokenizer"):
        """proto: a serialized SentencePiece model (the bytes of a tokenizer.model)."""
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{source}: not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()

    @classmethod
    def from_file(cls, model_file: str | Path) -> Tokenizer:
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"tokenizer not found: {model_file}")
        return cls(model_file.read_bytes(), str(model_file))

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path) -> Tokenizer:
        """A GGUF's own tokenizer, else the tokenizer.model of a checkpoint directory (or beside a file)."""
        return cls(checkpoint.tokenizer_proto(path_or_hub_id), str(path_or_hub_id))

    def encode(self, text: str, bos: bool = False, num_images: int = 0, tokens_per_image: int = 256) -> list[int]:
        """Text -> ids. With num_images, the text marks where each image goes with "<start_of_image>" (see
        place_images); each becomes "\\n\\n<start_of_image>" + tokens_per_image soft tokens + "<end_of_image>\\n\\n",
        as transformers' Gemma3Processor expands it (the model puts the image's features at the soft tokens)."""
        check_text(text)
        ids = [BOS_ID] * bos
        if not num_images:
            return ids + self.plain(text)
        pieces = text.split(IMAGE_MARK)
        if len(pieces) - 1 != num_images:
            raise ValueError(f"the prompt marks {len(pieces) - 1} image place(s) with {IMAGE_MARK} for {num_images}")
        image = [START_OF_IMAGE_ID, *[IMAGE_TOKEN_ID] * tokens_per_image, END_OF_IMAGE_ID]
        for i, piece in enumerate(pieces):
            last = i == num_images
            ids += self.plain(("\n\n" if i else "") + piece + ("" if last else "\n\n"))
            ids += [] if last else image
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

    def chat_prompt(self, messages: list[dict], system: str | None = None, tokens_per_image: int = 256) -> list[int]:
        """Gemma's chat template, ending with the opened model turn:
        <bos><start_of_turn>user\\n{system}\\n\\n{message}<end_of_turn>\\n<start_of_turn>model\\n ...

        messages: [{"role": "user" | "model", "content": str, "images": int (optional, default 0)}, ...].
        There is no system role in Gemma: the system prompt is prepended to the first user message.
        """
        ids = [BOS_ID]
        for i, m in enumerate(messages):
            ids += self.turn(m["role"], m["content"], m.get("images", 0), system if i == 0 else None, tokens_per_image)
        return ids + self.model_turn()

    def turn(
        self, role: str, content: str, num_images: int = 0, system: str | None = None, tokens_per_image: int = 256
    ) -> list[int]:
        """One closed turn, "<start_of_turn>{role}\\n{system}\\n\\n{content}<end_of_turn>\\n". The images go where
        the content marks them, else before it (place_images). Special tokens are inserted by id, so text
        that happens to contain "<start_of_turn>" stays plain text."""
        if role not in ("user", "model"):
            raise ValueError(f"chat role must be 'user' or 'model', not {role!r}")
        check_text(content)  # here, so that an error counts characters of the content as given
        text = place_images(content, num_images)
        text = f"{system}\n\n{text}" if system else text
        body = self.encode(f"{role}\n{text}", num_images=num_images, tokens_per_image=tokens_per_image)
        return [START_OF_TURN_ID, *body, END_OF_TURN_ID, *self.encode("\n")]

    def model_turn(self) -> list[int]:
        """The opened model turn that a reply continues: "<start_of_turn>model\\n"."""
        return [START_OF_TURN_ID, *self.encode("model\n")]


IMAGE_CONTROLS = re.compile("(<start_of_image>|<end_of_image>)")  # as split by Tokenizer.plain


def check_text(text: str) -> None:
    """A ValueError for text that is not Unicode: bytes that did not decode (Python keeps them as lone
    surrogates, in command-line arguments and in stdin read with errors="surrogateescape")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"the lone surrogate U+{code:04X}"
        raise ValueError(f"the text is not valid UTF-8: {what} at character {e.start}") from None


def place_images(text: str, num_images: int) -> str:
    """The text with a "<start_of_image>" mark per image: its own marks if it has any, else all the images
    before the text (where transformers' chat template puts them)."""
    if num_images and IMAGE_MARK not in text:
        return IMAGE_MARK * num_images + text
    return text


def is_instruction_tuned(name: str | Path) -> bool:
    """Gemma's instruction-tuned checkpoints are named *-it (gemma-3-4b-it, gemma-3-1b-it-int4, ...)."""
    return re.search(r"(^|[-_./])(it|instruct)([-_./]|$)", Path(name).name, re.IGNORECASE) is not None


class StreamDecoder:
    """Turns generated ids into text as it becomes printable: a multi-byte character split over
    byte-fallback tokens waits for its last byte, and leading spaces of pieces are kept."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one token; return the new printable text (possibly "")."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            return ""
        new, self.text = text[len(self.text) :], text
        return new
