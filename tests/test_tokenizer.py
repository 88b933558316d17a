import pytest

import tokenizer as tk
from tokenizer import StreamDecoder, Tokenizer


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
