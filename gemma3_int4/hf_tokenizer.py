"""Gemma's tokenizer between its two files: SentencePiece's tokenizer.model (what tokenizer.py runs) and the
Hugging Face layout's tokenizer files.

SentencePiece -> Hugging Face (`tokenizer_files`, written beside an export so that transformers, vLLM and SGLang
tokenize, add <bos> and stop as we do): tokenizer.json (Hugging Face tokenizers' own file, which loads without
sentencepiece or protobuf), tokenizer_config.json, special_tokens_map.json and generation_config.json.
SentencePiece's BPE merges the adjacent pair whose merged piece scores highest; tokenizers' merges the pair of
lowest rank. So each piece that two others make becomes a merge ranked by its score (as transformers' own converter
ranks them). Control pieces (<bos>, <start_of_turn>, ...) become special added tokens and user-defined ones
(newline and whitespace runs, <start_of_image>) added tokens matched on the normalized text, as SentencePiece
matches them.

Hugging Face -> SentencePiece (`tokenizer_json_proto`: Gemma 4's checkpoints ship only a tokenizer.json), through
a SentencePiece model written by hand (`sentencepiece_proto`; `parse_sentencepiece_proto` reads one back), which
spares a protobuf dependency; formats/gguf.py rebuilds a GGUF's tokenizer with it too.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from .config import BOS_ID, EOS_ID, PAD_ID, UNK_ID

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # SentencePiece's piece types (also 2 unknown, 5 unused, 6 byte)


def tokenizer_files(
    proto: bytes, chat_template: str | None, add_bos: bool, stop_ids: list[int], max_length: int
) -> dict[str, str]:
    """File name -> content of the four files for a SentencePiece model (a serialized tokenizer.model)."""
    entries = [(piece.decode(), score, kind) for piece, score, kind in parse_sentencepiece_proto(proto)]
    special = {"bos_token": entries[BOS_ID][0], "eos_token": entries[EOS_ID][0], "unk_token": entries[UNK_ID][0],
               "pad_token": entries[PAD_ID][0]}  # fmt: skip
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": add_bos, "add_eos_token": False, **special,
              "model_max_length": max_length, "clean_up_tokenization_spaces": False,
              "spaces_between_special_tokens": False}  # fmt: skip
    if chat_template:
        config["chat_template"] = chat_template
    generation = {"bos_token_id": BOS_ID, "eos_token_id": stop_ids, "pad_token_id": PAD_ID}
    return {
        "tokenizer.json": json.dumps(tokenizer_json(entries, add_bos), ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False),
        "generation_config.json": json.dumps(generation, indent=2),
    }


def tokenizer_json(entries: list[tuple[str, float, int]], add_bos: bool) -> dict:
    """Gemma's SentencePiece BPE, its (piece, score, type) entries (byte fallback, spaces as U+2581, no normalization,
    no dummy prefix), as tokenizers' BPE."""
    vocab = {piece: i for i, (piece, _, _) in enumerate(entries)}
    added = [
        {"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": kind == USER_DEFINED, "special": kind == CONTROL}
        for i, (piece, _, kind) in enumerate(entries) if kind in (CONTROL, USER_DEFINED)
    ]  # fmt: skip
    bos = entries[BOS_ID][0]
    single = [{"SpecialToken": {"id": bos, "type_id": 0}}] * add_bos + [{"Sequence": {"id": "A", "type_id": 0}}]
    pair = single + [{"SpecialToken": {"id": bos, "type_id": 1}}] * add_bos + [{"Sequence": {"id": "B", "type_id": 1}}]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
                           "special_tokens": {bos: {"id": bos, "ids": [BOS_ID], "tokens": [bos]}} if add_bos else {}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {"type": "BPE", "dropout": None, "unk_token": entries[UNK_ID][0], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges(entries, vocab)},
    }  # fmt: skip


def merges(entries: list[tuple[str, float, int]], vocab: dict[str, int]) -> list[list[str]]:
    """Every (left, right) that makes a normal piece out of two pieces of the vocabulary, ranked by the made piece's
    score (highest first), then by the two parts' ids."""
    ranked = []
    for piece, score, kind in entries:
        if kind != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    return [[left, right] for *_, left, right in sorted(ranked)]


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
