"""tokenizer.py: special ids, round trips, the chat template against the checkpoint's, streaming decode, which
models are instruction-tuned, and bad tokenizer files."""

import random

import pytest

from gemma3_int4 import tokenizer as tk
from gemma3_int4.tokenizer import StreamDecoder, Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return Tokenizer.from_file(tokenizer_file)


def test_special_ids(tok):
    assert [tok.sp.id_to_piece(i) for i in (0, 1, 2, 3, 105, 106)] == [
        "<pad>", "</s>", "<s>", "<unk>", "<start_of_turn>", "<end_of_turn>"
    ]  # fmt: skip
    assert tok.encode("hi", bos=True)[0] == tk.BOS_ID and tk.BOS_ID not in tok.encode("hi")


def test_roundtrip_multilingual(tok):
    for text in ["The quick brown fox.", "  two leading spaces", "naïve café 日本語 🦀 ∑", "x = f(3.14)\n\tpass"]:
        assert tok.decode(tok.encode(text)) == text


def test_chat_prompt_matches_the_template(tok):
    ids = tok.chat_prompt(
        [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello!"}, {"role": "user", "content": "Q"}],
        system="Be brief.",
    )
    pieces = []
    for i in ids:
        pieces.append({2: "<bos>", 105: "<start_of_turn>", 106: "<end_of_turn>"}.get(i) or tok.decode([i]))
    assert "".join(pieces) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\n"
    )
    # the user's text is never read as a special token
    assert tok.chat_prompt([{"role": "user", "content": "<start_of_turn>"}]).count(105) == 2
    with pytest.raises(ValueError, match="role must be"):
        tok.chat_prompt([{"role": "system", "content": "x"}])


def test_stream_decoder_prints_exactly_the_text(tok):
    text = "Hello wörld, 日本語 and 🦀🦀 with  spaces."
    stream = StreamDecoder(tok)
    chunks = [stream.push(i) for i in tok.encode(text)]
    assert "".join(chunks) == text
    assert "\ufffd" not in "".join(chunks)
    assert any(c.startswith(" ") for c in chunks)  # leading spaces of pieces are kept


CHARACTERS = [(0x80, 0x7FF), (0x3000, 0x9FFF), (0x1F300, 0x1FAFF)]  # of two, three and four UTF-8 bytes


def streamed_by_decoding_everything(tok: Tokenizer, ids: list[int]) -> list[str]:
    """StreamDecoder's specification, as it was first written: on every push, decode all the ids so far and
    return what is new, unless the text ends in U+FFFD (a character's first bytes)."""
    pieces, printed = [], ""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        pieces.append("" if text.endswith("\ufffd") else text[len(printed) :])
        printed = printed if text.endswith("\ufffd") else text
    return pieces


@pytest.fixture(scope="module")
def real_tok(real_gguf):
    return Tokenizer.from_pretrained(real_gguf)


def test_stream_decoder_streams_as_decoding_everything(real_tok):
    """Random ids of the real 262144-piece vocabulary (control tokens, byte pieces, pieces holding U+FFFD, ids
    past it), CJK and emoji text, and valid UTF-8 split over byte pieces: each push returns what decoding all
    the ids so far would add, and the pieces make the whole decoded text."""
    tok, rng = real_tok, random.Random(0)
    byte_pieces = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]
    replacement = [i for i in range(tok.vocab_size) if "\ufffd" in tok.sp.id_to_piece(i)]
    text = tok.encode("naïve café, 日本語の文章 🦀👍🏽 Привет\ufffd  two spaces\n\n∑")
    pools = [range(tok.vocab_size + 64), byte_pieces, replacement, [1, 2, 105, 106], text, [262144, 262207]]
    for _ in range(300):
        ids = [rng.choice(rng.choices(pools, weights=[3, 4, 1, 1, 3, 1])[0]) for _ in range(rng.randint(1, 40))]
        chars = "".join(chr(rng.randint(*rng.choice(CHARACTERS))) for _ in range(4))
        ids += [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in chars.encode()] * rng.randint(0, 1)
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids]
        assert pieces == streamed_by_decoding_everything(tok, ids), ids
        assert stream.text == "".join(pieces)
        if not tok.decode(ids).endswith("\ufffd"):
            assert "".join(pieces) == tok.decode(ids)
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in text) == tok.decode(text)


def test_stream_decoder_decodes_each_id_a_few_times(real_tok, monkeypatch):
    """A 4096-token reply: the ids decoded over all its pushes grow linearly with its length (decoding all of
    them on every push was 8 million ids, 1.2 s of the server's event loop)."""
    tok = real_tok
    reply = (tok.encode("Hello wörld, 日本語 and 🦀 with  spaces. ") * 300)[:4096]
    decoded, decode = [], tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids: decoded.append(len(ids)) or decode(ids))
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in reply) == decode(reply)
    assert sum(decoded) < 12 * len(reply) and max(decoded) < 12


def test_is_instruction_tuned():
    assert tk.is_instruction_tuned("gaunernst/gemma-3-4b-it-int4")
    assert tk.is_instruction_tuned("/models/gemma-3-1b-it")
    assert not tk.is_instruction_tuned("google/gemma-3-270m")
    assert not tk.is_instruction_tuned("/data/edit/gemma-3-1b-pt")


def test_is_base_model():
    assert tk.is_base_model("gemma-3-270m", None)  # the embedded default
    assert tk.is_base_model("google/gemma-3-270m", "{{ messages }}")  # Google's base repos carry the template too
    assert tk.is_base_model("/models/my-gemma-pt.gguf", "{{ messages }}")
    assert not tk.is_base_model("gaunernst/gemma-3-1b-it-int4", None)
    assert not tk.is_base_model("./my-finetune", "{{ messages }}")  # a name that does not tell: the template does
    assert tk.is_base_model("./my-finetune", None)


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        Tokenizer.from_file(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_file(tmp_path / "tokenizer.model")
