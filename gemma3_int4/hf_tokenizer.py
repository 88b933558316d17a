"""The tokenizer files of the Hugging Face layout, built from Gemma's SentencePiece model, so that transformers,
vLLM and SGLang tokenize, add <bos> and stop as we do: tokenizer.json (Hugging Face tokenizers' own file, which
loads without sentencepiece or protobuf), tokenizer_config.json, special_tokens_map.json and generation_config.json.

SentencePiece's BPE merges the adjacent pair whose merged piece scores highest; tokenizers' merges the pair of
lowest rank. So each piece that two others make becomes a merge ranked by its score (as transformers' own converter
ranks them). Control pieces (<bos>, <start_of_turn>, ...) become special added tokens and user-defined ones
(newline and whitespace runs, <start_of_image>) added tokens matched on the normalized text, as SentencePiece
matches them.
"""

from __future__ import annotations

import json

from .config import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from .sentencepiece_model import parse_sentencepiece_proto

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
