"""Gemma's SentencePiece tokenizer, its special tokens, the chat template and streaming decode."""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

import checkpoint

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN_ID, END_OF_TURN_ID = 105, 106
STOP_IDS = (EOS_ID, END_OF_TURN_ID)


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

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return [BOS_ID] * bos + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def chat_prompt(self, messages: list[dict[str, str]], system: str | None = None) -> list[int]:
        """Gemma's chat template, ending with the opened model turn:
        <bos><start_of_turn>user\\n{system}\\n\\n{message}<end_of_turn>\\n<start_of_turn>model\\n ...

        messages: [{"role": "user" | "model", "content": str}, ...]. There is no system role in Gemma:
        the system prompt is prepended to the first user message. Special tokens are inserted by id,
        so text that happens to contain "<start_of_turn>" stays plain text.
        """
        ids = [BOS_ID]
        for i, m in enumerate(messages):
            if m["role"] not in ("user", "model"):
                raise ValueError(f"chat role must be 'user' or 'model', not {m['role']!r}")
            text = f"{system}\n\n{m['content']}" if i == 0 and system else m["content"]
            ids += [START_OF_TURN_ID, *self.encode(f"{m['role']}\n{text}"), END_OF_TURN_ID, *self.encode("\n")]
        return ids + [START_OF_TURN_ID, *self.encode("model\n")]


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
