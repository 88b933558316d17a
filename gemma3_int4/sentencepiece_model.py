"""Gemma's SentencePiece model (a serialized tokenizer.model) as bytes, without a protobuf dependency: written
by hand from its pieces (`sentencepiece_proto`), parsed back (`parse_sentencepiece_proto`), and built from a
Hugging Face tokenizer.json (`tokenizer_json_proto`: Gemma 4's checkpoints ship only that). A GGUF's tokenizer
metadata is rebuilt through the same writer (formats/gguf.py), and hf_tokenizer.py goes the other way.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

# The writer follows sentencepiece_model.proto's field numbers.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    if isinstance(value, bytes):  # length-delimited
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):  # fixed32
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(value & 0xFFFFFFFFFFFFFFFF)  # varint (bool, int, enum)


def merge_scores(pieces: list[str], merges: list[list[str]]) -> list[float]:
    """SentencePiece scores for a BPE given as ranked merges (tokenizers', llama.cpp's gemma4): tokenizers merges
    the pair of lowest rank first, SentencePiece the pair whose piece scores highest, so a piece scores minus the
    rank of the first merge that makes it."""
    rank = {}
    for r, (left, right) in enumerate(merges):
        rank.setdefault(left + right, r)
    return [-float(rank.get(piece, 0)) for piece in pieces]


def sentencepiece_proto(pieces: list[bytes], scores, types, ids: dict[str, int | None]) -> bytes:
    """Gemma's settings: BPE with byte fallback, no normalization, no dummy prefix, spaces as U+2581."""
    proto = b"".join(
        _field(1, _field(1, p) + _field(2, float(s)) + _field(3, int(t)))
        for p, s, t in zip(pieces, scores, types, strict=True)
    )
    trainer = _field(3, 2) + _field(4, len(pieces)) + _field(35, True)  # model_type BPE, vocab_size, byte_fallback
    for number, key in ((40, "unknown"), (41, "bos"), (42, "eos"), (43, "padding")):
        trainer += _field(number, -1 if ids[key] is None else ids[key])
    normalizer = _field(1, b"identity") + _field(3, False) + _field(4, False) + _field(5, True)
    return proto + _field(2, trainer) + _field(3, normalizer)


def parse_sentencepiece_proto(proto: bytes) -> list[tuple[bytes, float, int]]:
    """(piece, score, type) of every piece of a serialized SentencePiece ModelProto (field 1 of it)."""

    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = _read_varint(buf, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _read_varint(buf, i)
            elif wire == 5:
                value, i = struct.unpack_from("<f", buf, i)[0], i + 4
            elif wire == 1:
                value, i = buf[i : i + 8], i + 8
            elif wire == 2:
                n, i = _read_varint(buf, i)
                value, i = buf[i : i + n], i + n
            else:
                raise ValueError(f"tokenizer: unsupported protobuf wire type {wire}")
            yield number, value

    pieces = []
    for number, value in fields(proto):
        if number == 1:
            p = {1: b"", 2: 0.0, 3: 1} | dict(fields(value))
            pieces.append((p[1], p[2], p[3]))
    return pieces


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def tokenizer_json_proto(path: Path) -> bytes:
    """A tokenizer.json (Hugging Face tokenizers' file: Gemma's is a BPE over text with spaces as U+2581, with byte
    fallback) as the same SentencePiece BPE model, scored by its merges (merge_scores). Its special
    tokens become control pieces, as in Gemma 3's tokenizer.model: inserted by id, never read from text
    (tokenizers would match "<|turn>" typed in a message); its other added tokens user-defined pieces."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model, added = data["model"], data.get("added_tokens") or []
        if model.get("type") != "BPE" or not model.get("byte_fallback"):
            raise ValueError(f"{path}: not Gemma's tokenizer (a BPE with byte fallback), but {model.get('type')!r}")
        by_id = {}
        for piece, i in model["vocab"].items():
            by_id.setdefault(i, piece)  # transformers' converter may add "\t" as a second name of <0x09>
        by_id |= {t["id"]: t["content"] for t in added}
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges") or []]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable tokenizer.json ({type(e).__name__}: {e})") from None
    special = {t["content"]: bool(t.get("special")) for t in added}
    pieces, types, seen = [], [], set()
    for i in range(max(by_id) + 1):
        piece = by_id.get(i)
        if piece is None or piece in seen:  # a gap, or a second id of one string: never produced by encoding
            pieces.append(f"<unused id {i}>")
            types.append(5)  # SentencePiece's piece types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused
            continue
        seen.add(piece)
        pieces.append(piece)
        if piece == model.get("unk_token"):
            types.append(2)
        elif piece in special:
            types.append(3 if special[piece] else 4)
        else:
            types.append(6 if BYTE_PIECE.fullmatch(piece) else 1)  # 6: byte
    vocab = {piece: i for i, piece in enumerate(pieces)}
    ids = {key: vocab.get(name) for key, name in
           (("unknown", model.get("unk_token")), ("bos", "<bos>"), ("eos", "<eos>"), ("padding", "<pad>"))}  # fmt: skip
    scores = merge_scores(pieces, merges)
    return sentencepiece_proto([piece.encode() for piece in pieces], scores, types, ids)
