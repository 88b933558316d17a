"""chat.py: the KV cache kept across turns (against recomputing the transcript), Ctrl-C mid-reply, a full
context, and the script driven through piped stdin, on tiny models and on the embedded 270M."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_main
from PIL import Image

import chat as chat_script
from chat import ContextFull, Conversation
from gemma3_int4 import checkpoint, generation, loader
from gemma3_int4.config import BOS_ID, END_OF_TURN_ID
from gemma3_int4.generation import Sampling, prefill
from gemma3_int4.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
GREEDY = Sampling(temperature=0)


@pytest.fixture(scope="module")
def tiny(tiny_int4_dir):
    return loader.from_pretrained(tiny_int4_dir, dtype=torch.float32), Tokenizer.from_pretrained(tiny_int4_dir)


def next_turn_logits_match_recomputing(chat: Conversation, text: str) -> None:
    """The logits that the next message's prefill gives through the live cache equal a fresh full forward.
    The cache is restored afterwards (its ring buffers cannot rewind), so the chat can go on."""
    tok = chat.tokenizer
    prompt = chat.ids + tok.turn("user", text) + tok.model_turn()
    saved = {name: b.clone() for name, b in chat.model.named_buffers()}
    with torch.no_grad():
        cached = prefill(chat.model, torch.tensor([prompt[chat.cached :]]), chat.cached)
        full = chat.model(torch.tensor([prompt]))[:, -1]
    for name, b in chat.model.named_buffers():
        b.copy_(saved[name])
    assert (cached - full).abs().max().item() < 1e-4


def test_turns_prefill_only_new_tokens_and_match_recomputing(tiny, monkeypatch):
    model, tok = tiny
    prefilled = []
    real_prefill = generation.prefill
    monkeypatch.setattr(generation, "prefill", lambda m, ids, start=0, **kw: prefilled.append((ids.shape[1], start))
                        or real_prefill(m, ids, start, **kw))  # fmt: skip
    chat = Conversation(model, tok, GREEDY, context=256, system="Be brief.", max_new_tokens=6)
    for i, text in enumerate(["Hello there, how are you?", "Tell me about classes.", "And modules?"]):
        cached_before, known_before = chat.cached, len(chat.ids)
        reply = "".join(chat.ask(text))
        assert chat.messages[-1] == {"role": "model", "content": reply, "images": []}
        new_tokens, start = prefilled[-1]
        assert start == cached_before and new_tokens > 0
        # only the turn's own tokens are prefilled: at most the last reply token and the closing tokens are redone
        assert start == 0 if i == 0 else known_before - start <= 2 + len(tok.encode("\n"))
        assert chat.ids[-2:] == [END_OF_TURN_ID, *tok.encode("\n")]
    assert chat.ids[0] == BOS_ID and chat.ids.count(BOS_ID) == 1 and chat.ids.count(105) == 6
    assert len(chat.ids) > 3 * model.config.sliding_window  # far past the ring buffers' window
    next_turn_logits_match_recomputing(chat, "One more question.")


def test_reset_starts_over_in_the_same_cache(tiny):
    model, tok = tiny
    chat = Conversation(model, tok, GREEDY, context=128, max_new_tokens=5)
    first = "".join(chat.ask("What is a list?"))
    "".join(chat.ask("And a tuple?"))
    chat.reset()
    assert chat.ids == [] and chat.messages == []
    assert "".join(chat.ask("What is a list?")) == first  # the old conversation is forgotten
    next_turn_logits_match_recomputing(chat, "Thanks.")


def test_ctrl_c_keeps_the_partial_reply_and_the_cache_consistent(tiny):
    model, tok = tiny
    chat = Conversation(model, tok, GREEDY, context=256, max_new_tokens=12)
    "".join(chat.ask("First question."))
    # Ctrl-C while the caller prints: the generator is closed after 3 pieces
    stream = chat.ask("Second question, please answer at length.")
    pieces = [next(stream) for _ in range(3)]
    stream.close()
    assert chat.messages[-1]["content"].startswith("".join(pieces))  # (a split UTF-8 character prints later)
    assert chat.ids[-2:] == [END_OF_TURN_ID, *tok.encode("\n")]
    next_turn_logits_match_recomputing(chat, "Third question.")

    # Ctrl-C inside a decode step (KeyboardInterrupt raised from the model)
    calls = []

    def interrupted_step(m, token, pos, rows):
        calls.append(pos)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return generation.decode_one_token(m, token, pos, rows)

    chat.decode_step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        "".join(chat.ask("Fourth question."))
    chat.decode_step = generation.decode_one_token
    assert chat.cached > 0 and chat.ids[-2:] == [END_OF_TURN_ID, *tok.encode("\n")]  # kept, closed, cache trusted
    next_turn_logits_match_recomputing(chat, "Fifth question.")


def test_ctrl_c_during_prefill_recomputes_next_turn(tiny, monkeypatch):
    model, tok = tiny
    chat = Conversation(model, tok, GREEDY, context=256, max_new_tokens=5)
    "".join(chat.ask("First question."))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(generation, "prefill", interrupted)
        with pytest.raises(KeyboardInterrupt):
            "".join(chat.ask("Second question."))
    assert chat.cached == 0 and chat.messages[-1]["content"] == ""  # nothing in the cache is trusted
    "".join(chat.ask("Third question."))
    next_turn_logits_match_recomputing(chat, "Fourth question.")


def test_context_full(tiny):
    model, tok = tiny
    chat = Conversation(model, tok, GREEDY, context=64)
    long = "word " * 80
    with pytest.raises(ContextFull, match="context full: .* the context holds 64"):
        "".join(chat.ask(long))
    assert chat.ids == [] and chat.messages == []  # nothing changed
    "".join(chat.ask("Hi"))  # no max_new_tokens: the reply runs to the context's end at most
    while not chat.reply_was_cut():
        try:
            "".join(chat.ask("Go on."))
        except ContextFull:
            break
    assert len(chat.ids) <= 64 + 2


def test_images_need_a_vision_model(tiny):
    model, tok = tiny
    chat = Conversation(model, tok, GREEDY, context=64)
    with pytest.raises(ValueError, match="text-only"):
        chat.attach("cat.png")


# ---------------------------------------------------------------------------------------------------
# The script, through piped stdin


def run_chat(stdin: str, *args):
    return run_main(chat_script, *args, stdin=stdin)


def test_piped_chat_with_commands(tiny_int4_dir, tmp_path):
    save = tmp_path / "chat.json"
    script = f"Hello!\n/help\n/image {tmp_path}/nope.png\n/bogus\nWhat is a dict?\n/save {save}\n/reset\nAgain.\n"
    out = run_chat(script, "--model", tiny_int4_dir, "--temperature", "0", "--max-new-tokens", "6",
                   "--system", "Be brief.")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "/image PATH" in out.stderr  # /help
    assert "text-only" in out.stderr and "unknown command /bogus" in out.stderr
    assert "(new conversation)" in out.stderr
    saved = json.loads(save.read_text())
    assert saved["system"] == "Be brief."
    assert [m["role"] for m in saved["messages"]] == ["user", "model", "user", "model"]
    assert saved["messages"][2]["content"] == "What is a dict?"
    replies = greedy_replies(tiny_int4_dir, ["Hello!", "What is a dict?"], ["Again."], "Be brief.", 6)
    assert out.stdout == "".join(r + "\n" for r in replies)  # the replies, each on its own line


def test_piped_chat_cuts_replies_at_the_default_limit_and_names_a_base_model(tiny_int4_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(chat_script, "REPLY_LIMIT", 3)  # the default of --max-new-tokens
    base = tmp_path / "gemma-3-tiny"  # a base model's name (no -it)
    base.symlink_to(tiny_int4_dir)
    out = run_chat("Hello!\n", "--model", base, "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout == greedy_replies(tiny_int4_dir, ["Hello!"], [], max_new_tokens=3)[0] + "\n"
    assert "(reply cut at 3 tokens: --max-new-tokens sets the limit)" in out.stderr
    notice = [line for line in out.stderr.splitlines() if "base model" in line]
    assert len(notice) == 1 and "not instruction-tuned" in notice[0]
    tuned = run_chat("Hello!\n", "--model", tiny_int4_dir, "--temperature", "0")
    assert "base model" not in tuned.stderr and "reply cut at 3 tokens" in tuned.stderr


def greedy_replies(model_dir, turns: list[str], after_reset: list[str], system=None, max_new_tokens=None) -> list[str]:
    """What the script should print: the Conversation API's greedy replies, with chat.py's defaults (bf16)."""
    model = loader.from_pretrained(model_dir) if model_dir else loader.from_pretrained(checkpoint.DEFAULT_MODEL)
    tok = Tokenizer.from_pretrained(model_dir or checkpoint.DEFAULT_MODEL)
    chat = Conversation(model, tok, GREEDY, min(8192, model.config.max_seq_len), system, max_new_tokens)
    replies = ["".join(chat.ask(text)) for text in turns]
    chat.reset()
    return replies + ["".join(chat.ask(text)) for text in after_reset]


def test_piped_chat_context_full_and_text_only_images(tiny_int4_dir, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    out = run_chat(f"{'word ' * 200}\n/image {tmp_path / 'x.png'}\nShort.\n/exit\nnever read\n", "--model",
                   tiny_int4_dir, "--context", "64", "--temperature", "0", "--max-new-tokens", "4")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "context full" in out.stderr and "/reset" in out.stderr
    assert "text-only" in out.stderr
    assert out.stdout.count("\n") == 1  # only "Short." was answered; /exit left before the last line


def test_piped_chat_with_an_image(tmp_path, tokenizer_file):
    from conftest import hf_multimodal_model, int4_checkpoint

    directory = tmp_path / "gemma-3-tiny-mm-it-int4"
    int4_checkpoint(hf_multimodal_model(), directory)
    (directory / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    Image.new("RGB", (40, 30), (200, 100, 50)).save(tmp_path / "a.png")
    out = run_chat(f"/image {tmp_path / 'nope.png'}\n/image {tmp_path / 'a.png'}\nWhat is this?\nAnd now?\n", "--model",
                   directory, "--temperature", "0", "--max-new-tokens", "3", "--dtype", "float32")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "image not found" in out.stderr and "attached" in out.stderr and out.stdout.count("\n") == 2


@pytest.mark.slow
def test_piped_chat_on_the_embedded_model(tmp_path):
    out = run_chat("The capital of France is\nAnd the capital of Italy is\n", "--temperature", "0",
                   "--max-new-tokens", "12")  # fmt: skip
    assert out.returncode == 0, out.stderr
    turns = ["The capital of France is", "And the capital of Italy is"]
    assert out.stdout == "".join(r + "\n" for r in greedy_replies(None, turns, [], max_new_tokens=12))
