"""serve.py's server on loopback, driven by the official openai client: chat and completions (streamed and
whole) against generate() on the same prompt, stop strings, concurrent streams each as it is alone, every kind
of bad request, a dropped stream, a full queue, the API key, images and audio, shutdown, and the chat page in a
browser."""

import asyncio
import base64
import collections
import contextlib
import http.client
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import test_gemma4
import torch
from conftest import hf_multimodal_model, int4_checkpoint
from PIL import Image
from test_gemma4_audio import gemma4_with_media, noise_image, speech_like, wav_bytes

from gemma3_int4 import gemma4_audio, generation, loader, server, vision
from gemma3_int4.checkpoint import DEFAULT_MODEL
from gemma3_int4.config import BOS_ID, STOP_IDS
from gemma3_int4.engine import Engine, Job
from gemma3_int4.gate import LOCAL_NAMES
from gemma3_int4.generation import Request, Sampling, compile_decode_step, generate
from gemma3_int4.openai_api import StopStrings
from gemma3_int4.server import build_app, listen, uvicorn_config
from gemma3_int4.tokenizer import AUDIO_MARK, IMAGE_MARK, Tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
gemma4_tokenizer = test_gemma4.gemma4_tokenizer_dir  # the fixture (pytest knows it by this name)
GREEDY = Sampling(temperature=0)


@contextlib.contextmanager
def serving(model, tokenizer, slots=8, context=512, max_queue=64, api_key=None, name="gemma-3-270m",
            max_body=2**20, hosts=LOCAL_NAMES, max_connections=100, idle_timeout=5.0, engine=None,
            max_tokens=None, log=None):  # fmt: skip
    """The app on a free loopback port, in a thread, as serve runs it: yields its base URL."""
    engine = engine or Engine(model, slots, context, max_queue=max_queue)
    app = build_app(engine, tokenizer, name, api_key, max_body, hosts, max_tokens, log)
    sock = listen("127.0.0.1", 0)
    config = uvicorn_config(app, max_connections, idle_timeout)
    config.timeout_graceful_shutdown = 2
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    engine.start()
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.stop()


def load_real():
    """The real 270M as serve.py loads it by default (converted once, then cached)."""
    return loader.from_pretrained(DEFAULT_MODEL), Tokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def real():
    """A server over the real 270M, and a second copy of the model to run each request alone on."""
    model, tokenizer = load_real()
    alone, _ = load_real()
    with serving(model, tokenizer) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield SimpleNamespace(url=url, client=client, tokenizer=tokenizer, alone=alone)


def alone_text(real, prompt: list[int], max_tokens: int) -> tuple[str, str]:
    """What generate() says to the prompt alone, greedy: (text, finish_reason)."""
    tokens = list(generate(real.alone, prompt, max_tokens, GREEDY, STOP_IDS))
    stopped = tokens[-1] in STOP_IDS
    return real.tokenizer.decode(tokens[:-1] if stopped else tokens), "stop" if stopped else "length"


def chat_ids(real, question: str, system: str | None = None) -> list[int]:
    return real.tokenizer.chat_prompt([{"role": "user", "content": question}], system)


def post(url: str, path: str, body, headers: dict | None = None) -> tuple[int, dict]:
    """A raw POST (bytes as they are, anything else as JSON): (status, JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_models_and_health(real):
    assert [m.id for m in real.client.models.list().data] == ["gemma-3-270m"]
    with contextlib.closing(http.client.HTTPConnection(*real.url[7:].split(":"))) as conn:
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and health["slots"] == 8 and health["vision"] is False


def test_chat_whole_and_streamed_is_what_generate_says(real):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."}]
    expected, reason = alone_text(real, chat_ids(real, "Name a color.", "Answer briefly."), 40)
    whole = real.client.chat.completions.create(model="x", messages=messages, max_tokens=40, temperature=0)
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == reason
    prompt_tokens = len(chat_ids(real, "Name a color.", "Answer briefly."))
    assert whole.usage.prompt_tokens == prompt_tokens and 0 < whole.usage.completion_tokens <= 40
    chunks = list(real.client.chat.completions.create(model="x", messages=messages, max_tokens=40, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected and len([c for c in chunks if c.choices]) > 3  # streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_whole_and_streamed(real):
    prompt = "The capital of France is"
    expected, _ = alone_text(real, [BOS_ID, *real.tokenizer.encode(prompt)], 24)
    whole = real.client.completions.create(model="x", prompt=prompt, max_tokens=24, temperature=0)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24
    streamed = real.client.completions.create(model="x", prompt=prompt, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    ids = [BOS_ID, *real.tokenizer.encode(prompt)]  # token ids as the prompt
    assert (
        real.client.completions.create(model="x", prompt=ids, max_tokens=24, temperature=0).choices[0].text == expected
    )


def test_stop_strings_cut_the_text_whole_and_streamed(real):
    prompt = "One, two, three,"
    expected, _ = alone_text(real, [BOS_ID, *real.tokenizer.encode(prompt)], 30)
    stop = expected.split()[3][:3]  # a few letters of the fourth word: a stop string inside a token's text
    cut = expected[: expected.index(stop)]
    whole = real.client.completions.create(model="x", prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
    streamed = real.client.completions.create(model="x", prompt=prompt, max_tokens=30, temperature=0, stop=stop,
                                              stream=True)  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_eight_concurrent_streams_each_as_alone(real):
    """8 streams at once (prompts of different lengths, so rows at different positions): all complete, each
    exactly what the same request says alone."""
    questions = ["Hi!", "What is 2+2?", "Name three fruits.", "Write a haiku about the sea.",
                 "Why is the sky blue?", "Say hello in French.", "Count to five.",
                 "What is the largest planet in the solar system?"]  # fmt: skip
    results = [None] * len(questions)

    def ask(i):
        stream = real.client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": questions[i]}], max_tokens=32, temperature=0, stream=True
        )
        results[i] = "".join(c.choices[0].delta.content or "" for c in stream)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == [alone_text(real, chat_ids(real, q), 32)[0] for q in questions]


def test_seeded_sampling_reproduces(real):
    ask = lambda seed: real.client.completions.create(model="x", prompt="Once upon a time", max_tokens=16,
                                                      seed=seed, temperature=1.0).choices[0].text  # fmt: skip
    assert ask(5) == ask(5) and ask(5) != ask(6)


BAD = [
    (b'{"messages": [', 400, "not valid JSON"),
    (b"[1, 2]", 400, ""),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "min_p": 1.5}, 400, "min_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ""}, 400, "stop"),
    ({"messages": [{"role": "system", "content": "be brief"}]}, 400, "user message"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]}, 400, "system"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "context is 512 tokens"),
    ({"messages": [{"role": "user", "content": "caf\udce9"}]}, 400, "UTF-8"),
    ({"prompt": [1, 2, 10**9]}, 400, "token ids"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 1e39, "repetition_penalty": 1e39}, 400,
     "temperature must be 0 (greedy) or from 0.01 to 100"),
    ({"prompt": "hi", "repetition_penalty": 1e39}, 400, "repetition_penalty must be from 0.01 to 100"),
    ({"prompt": "hi", "temperature": 1e-30}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 3000, "y" * 1097]}, 400, "4096 characters"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools: not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400,
     "response_format: not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs: not supported"),
    ({"prompt": "hi", "logprobs": 2, "stream": True}, 400, "logprobs: not supported"),
    ({"prompt": "hi", "echo": True, "stream": True}, 400, "echo: not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]}, 400,
     "part 0 has type 'file'"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
                   {"role": "user", "content": "hi"}]}, 400, "system messages are text only"),
]  # fmt: skip


@pytest.mark.parametrize("body, status, words", BAD)
def test_bad_requests_get_openai_errors(real, body, status, words):
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    code, answer = post(real.url, path, body)  # (json.dumps writes the lone surrogate as \\udce9)
    assert code == status and set(answer["error"]) >= {"message", "type", "param"}
    assert words.lower() in answer["error"]["message"].lower(), answer


def chunked_post(url: str, chunks: list[bytes], head: bytes = b"") -> tuple[int, dict]:
    """A POST of /v1/completions with a chunked body (and more header lines, as they are)."""
    conn = http.client.HTTPConnection(*url[7:].split(":"), timeout=30)
    conn.connect()
    conn.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n%s\r\n" % head)  # fmt: skip
    with contextlib.suppress(OSError):  # (refused before it is all sent)
        conn.sock.sendall(b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [*chunks, b""]))
    response = http.client.HTTPResponse(conn.sock, method="POST")
    response.begin()
    return response.status, json.loads(response.read())


def test_a_body_over_the_limit_is_refused_by_the_bytes_read(real):
    """The test server takes 1 MiB: a larger body is refused by its Content-Length, or when its chunks pass the
    limit, whatever Content-Length it claims beside them; a small chunked body is served."""
    body = {"messages": [{"role": "user", "content": "x" * 2**20}]}
    code, answer = post(real.url, "/v1/chat/completions", body)
    assert code == 413 and "over 1048576 bytes" in answer["error"]["message"]
    chunks = [b'{"prompt": "', *[b"x" * 2**16] * 32, b'", "max_tokens": 1}']  # 2 MiB, "Content-Length: 10"
    code, answer = chunked_post(real.url, chunks, b"Content-Length: 10\r\n")
    assert code == 413 and "over 1048576 bytes" in answer["error"]["message"]
    code, answer = chunked_post(real.url, [b'{"prompt": "Hi", ', b'"max_tokens": 2}'])
    assert code == 200 and answer["usage"]["completion_tokens"] == 2


def test_non_finite_sampling_values_are_refused(real):
    for value in (b"NaN", b"Infinity"):  # Python's json reads them; they must not reach the sampler
        body = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + value + b"}"
        code, answer = post(real.url, "/v1/chat/completions", body)
        assert code == 400 and "temperature" in answer["error"]["message"]


def image_message(*urls: str, text: str = "What is this?") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]}


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def test_images_for_a_text_only_model_are_refused_undecoded(real, monkeypatch):
    """Refused before anything is decoded: a bomb's header is not even read."""
    monkeypatch.setattr(vision, "load_image", lambda *args, **kwargs: pytest.fail("an image was decoded"))
    code, answer = post(real.url, "/v1/chat/completions", image_message(*[data_url(png_header(13000, 13000))] * 8))
    assert code == 400 and "text-only" in answer["error"]["message"]


def get(url: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    with contextlib.closing(http.client.HTTPConnection(*url[7:].split(":"), timeout=10)) as conn:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()


def health(url: str) -> dict:
    with contextlib.closing(http.client.HTTPConnection(*url[7:].split(":"), timeout=10)) as conn:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())


def wait_for_active(url: str, active: int, seconds: float) -> float:
    """Seconds until /health shows `active` rows busy (at most `seconds`, then fails)."""
    start = time.monotonic()
    while health(url)["active"] != active:
        assert time.monotonic() - start < seconds, health(url)
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_frees_its_row_within_a_second(real, stream):
    """A request whose client goes away mid-reply (curl -m2): its row is free within a second, whole or streamed."""
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 2000, "stream": stream}
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", int(real.url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))  # fmt: skip
    wait_for_active(real.url, 1, 30)
    time.sleep(0.3)  # decoding
    sock.close()
    assert wait_for_active(real.url, 0, 1.0) < 1.0
    assert real.client.completions.create(model="x", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_a_full_queue_answers_503():
    model, tokenizer = load_real()
    with serving(model, tokenizer, slots=1, max_queue=1) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        streams = [client.completions.create(model="x", prompt="Hi", max_tokens=300, stream=True) for _ in range(2)]
        next(iter(streams[0]))  # one decoding, one waiting
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="x", prompt="Hi", max_tokens=5)
        assert e.value.status_code == 503 and "busy" in str(e.value)
        for s in streams:
            s.close()


def test_an_api_key_is_required_when_set():
    model, tokenizer = load_real()
    with serving(model, tokenizer, api_key="s3cret") as url:
        code, answer = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert code == 401 and answer["error"]["type"] == "authentication_error"
        code, _ = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}, {"Authorization": "Bearer wrong"})
        assert code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="x", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        lowercase = {"Authorization": "bearer s3cret"}  # the scheme's name is case-insensitive
        assert post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}, lowercase)[0] == 200
        assert get(url, "/openapi.json")[0] == 401 and get(url, "/openapi.json", lowercase)[0] == 200
        assert health(url)["status"] == "ok" and get(url, "/")[0] == 200  # /health and the page need no key


def image_file(format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((40, 40), 60).convert("RGB").save(buffer, format)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (a decompression bomb's, as far as anything reads before decoding)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(99))) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory, tokenizer_file) -> Path:
    """A tiny multimodal int4 checkpoint directory (4 soft tokens per image) with a tokenizer."""
    directory = tmp_path_factory.mktemp("mm") / "gemma-3-tiny-mm-it-int4"
    int4_checkpoint(hf_multimodal_model(tokens_per_image=4), directory)
    shutil.copy(tokenizer_file, directory / "tokenizer.model")
    return directory


def test_images_as_data_urls(tiny_vision):
    """An image part is the image generate() sees, in its place in the text."""
    directory = tiny_vision
    model, tokenizer = loader.from_pretrained(directory), Tokenizer.from_file(directory / "tokenizer.model")
    alone = loader.from_pretrained(directory)
    png = image_file()
    pixels = vision.preprocess(Image.open(io.BytesIO(png)), model.config.vision_config.image_size)[None]
    message = {"role": "user", "content": "Look: <start_of_image> what is it?", "images": 1}
    prompt = tokenizer.chat_prompt([message], tokens_per_image=4)
    tokens = list(generate(alone, prompt, 12, GREEDY, STOP_IDS, pixel_values=pixels))
    expected = tokenizer.decode([t for t in tokens if t not in STOP_IDS])
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [{"type": "text", "text": "Look: "}, {"type": "image_url", "image_url": {"url": url}},
               {"type": "text", "text": " what is it?"}]  # fmt: skip
    with serving(model, tokenizer, context=128, name="tiny") as server_url:
        client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                               max_tokens=12, temperature=0)  # fmt: skip
        assert health(server_url)["vision"] is True
    assert reply.choices[0].message.content == expected


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_images_for_a_vision_model(tiny_vision):
    """Each refused with a 400 naming the problem: a bomb by the size in its header, before anything is decoded
    (at 96 megapixels Pillow only warns); more images than the context holds before any is decoded."""
    model, tokenizer = loader.from_pretrained(tiny_vision), Tokenizer.from_file(tiny_vision / "tokenizer.model")
    with serving(model, tokenizer, context=128, name="tiny") as url:
        for body, words in [
            (image_message("https://x/y.png"), "only data: URLs"),
            (image_message("data:image/png;base64,aGVsbG8="), "not a PNG/JPEG/WEBP/GIF/BMP image"),
            (image_message(data_url(image_file("EPS"))), "not a PNG/JPEG/WEBP/GIF/BMP image"),  # (Ghostscript's)
            (image_message("data:image/png;base64,not base64!"), "not base64"),
            (image_message(data_url(png_header(12000, 8000))), "12000x8000 pixels, more than the 89478485 allowed"),
            (image_message(*[data_url(image_file())] * 32), "32 images take 128 tokens, but the context is 128"),
        ]:
            code, answer = post(url, "/v1/chat/completions", body)
            assert code == 400 and words in answer["error"]["message"], answer


def test_concurrent_requests_decode_their_images_in_turn(tiny_vision, monkeypatch):
    """One image at full size in memory at a time, however many requests bring one (an 89-megapixel PNG of 300 kB
    decodes to over 300 MB; the threads of 40 requests at once would hold 40)."""
    load, decoding, most = vision.load_image, [], []

    def slow_load(*args, **kwargs):
        decoding.append(None)
        most.append(len(decoding))
        time.sleep(0.2)
        try:
            return load(*args, **kwargs)
        finally:
            decoding.pop()

    monkeypatch.setattr(vision, "load_image", slow_load)
    model, tokenizer = loader.from_pretrained(tiny_vision), Tokenizer.from_file(tiny_vision / "tokenizer.model")
    body, codes = {**image_message(data_url(image_file())), "max_tokens": 1}, []
    with serving(model, tokenizer, context=128, name="tiny") as url:
        threads = [threading.Thread(target=lambda: codes.append(post(url, "/v1/chat/completions", body)[0]))
                   for _ in range(4)]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert codes == [200] * 4 and most == [1] * 4


@pytest.fixture(scope="module")
def tiny_gemma4(tmp_path_factory, gemma4_tokenizer) -> tuple:
    """A tiny random Gemma 4 with a vision and an audio tower (float32), and its tokenizer. Its (tied) embedding
    rows past the tokenizer's 512 pieces are zeroed, so that replies are made of pieces whose text tells them apart
    (the ids past them, most of a random model's, decode to nothing)."""
    directory = tmp_path_factory.mktemp("gemma4") / "gemma-4-tiny-it"
    gemma4_with_media(directory, gemma4_tokenizer)
    model, tokenizer = (
        loader.from_pretrained(directory, dtype=torch.float32, weights="dense"),
        Tokenizer.from_pretrained(directory),
    )
    model.embed.weight.data[tokenizer.vocab_size :] = 0
    return model, tokenizer


def audio_message(data: bytes | str, format: str = "wav", text: str = "What is it?") -> dict:
    data = data if isinstance(data, str) else base64.b64encode(data).decode()
    part = {"type": "input_audio", "input_audio": {"data": data, "format": format}}
    return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": text}]}]}


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_gemma4_images_and_audio(tiny_gemma4, kind):
    """On Gemma 4, an image_url part and an input_audio part are what generate() sees, in their places in the
    text (each with its own count of soft tokens)."""
    model, tokenizer = tiny_gemma4
    wav = wav_bytes(speech_like(0.6), 16_000)
    if kind == "image":
        media, counts = generation.image_inputs(model, [noise_image()])
        message = {"role": "user", "content": f"Look: {IMAGE_MARK} what is it?", "images": 1}
        prompt = tokenizer.chat_prompt([message], tokens_per_image=counts)
        part = {"type": "image_url", "image_url": {"url": data_url(noise_png())}}
    else:
        media, counts = generation.audio_inputs([gemma4_audio.load_audio(io.BytesIO(wav))])
        message = {"role": "user", "content": f"Look: {AUDIO_MARK} what is it?", "audio": counts}
        prompt = tokenizer.chat_prompt([message])
        part = audio_message(wav)["messages"][0]["content"][0]
    tokens = list(generate(model, prompt, 8, GREEDY, tokenizer.stop_ids, pixel_values=media))
    expected = tokenizer.decode([t for t in tokens if t not in tokenizer.stop_ids])
    assert expected  # (a reply in the pieces: see tiny_gemma4)
    content = [{"type": "text", "text": "Look: "}, part, {"type": "text", "text": " what is it?"}]
    with serving(model, tokenizer, context=512, name="tiny4") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="tiny4", messages=[{"role": "user", "content": content}],
                                               max_tokens=8, temperature=0)  # fmt: skip
        assert health(url)["vision"] is True and health(url)["audio"] is True
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(tokens)
    assert reply.choices[0].message.content == expected.rstrip("\ufffd")  # (a last character cut short is held back)


def test_bad_audio_and_too_many_soft_tokens(tiny_gemma4, real):
    """Each refused with a one-line 400 naming the problem; audio to a model without an audio tower too."""
    model, tokenizer = tiny_gemma4
    wav = wav_bytes(speech_like(0.6), 16_000)
    long = wav_bytes(np.zeros(31_000, np.float32), 1_000)  # 31 s (at 1 kHz: a small body)
    with serving(model, tokenizer, context=270, name="tiny4") as url:
        for body, words in [
            (audio_message(wav, format="mp3"), "input_audio: format 'mp3' is not read; send WAV"),
            (audio_message("not base64!"), "input_audio: not base64"),
            (audio_message(b"ID3" + bytes(64)), "input_audio: not a WAV file"),
            (audio_message(long), "input_audio: 31.0 s of audio, more than the 30 s allowed"),
            (audio_message(wav_bytes(np.zeros(100, np.float32), 16_000)), "holds no audio frame"),
            (image_message(data_url(noise_png())), "260 of them the soft tokens of 1 image(s) and 0 recording(s), "
                                                   "but the context is 270 tokens"),
            (image_message(*[data_url(noise_png())] * 3), "2 of the 3 images take 520 soft tokens, but the context is "
                                                         "270 tokens"),
        ]:  # fmt: skip
            code, answer = post(url, "/v1/chat/completions", {**body, "max_tokens": 1})
            message = answer["error"]["message"]
            assert code == 400 and words in message and "\n" not in message, answer
    code, answer = post(real.url, "/v1/chat/completions", audio_message(wav))
    assert code == 400 and answer["error"]["message"] == "this model has no audio tower: audio needs Gemma 4 E2B or E4B"


def noise_png() -> bytes:
    png = io.BytesIO()
    noise_image().save(png, "PNG")
    return png.getvalue()


@pytest.fixture(scope="module")
def tiny(tiny_int4_dir):
    """The tiny int4 model and its tokenizer: for servers whose replies do not matter."""
    return loader.from_pretrained(tiny_int4_dir), Tokenizer.from_file(tiny_int4_dir / "tokenizer.model")


def closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection (waiting up to the socket's timeout)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_request_that_fails_fails_alone(real, monkeypatch):
    """A request whose sampling raises (at its prefill, or in a decode step) gets a 500 or an error event in
    OpenAI's shape; the engine serves on."""
    sample = generation.sample
    calls = collections.Counter()

    def failing(logits, s, *args):  # fails the requests sampled at temperature 0.5, on their `s.top_k`-th token
        calls[s.top_k] += s.temperature == 0.5
        if s.temperature == 0.5 and calls[s.top_k] == s.top_k:
            raise IndexError("argmax on an empty tensor")
        return sample(logits, s, *args)

    monkeypatch.setattr(generation, "sample", failing)
    code, answer = post(real.url, "/v1/completions", {"prompt": "Hi", "temperature": 0.5, "top_k": 1})
    assert code == 500 and "prefill failed: IndexError" in answer["error"]["message"], answer
    assert answer["error"]["type"] == "server_error"
    stream = real.client.completions.create(model="x", prompt="Hi", max_tokens=20, temperature=0.5, stream=True,
                                            extra_body={"top_k": 3})  # fmt: skip
    with pytest.raises(openai.APIError, match="decoding failed: IndexError"):
        list(stream)
    assert health(real.url)["active"] == 0
    assert real.client.completions.create(model="x", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_a_bug_in_a_handler_is_a_500_in_openais_shape(real, monkeypatch):
    """Not Starlette's plain-text "Internal Server Error": clients read the error as any other."""
    monkeypatch.setattr(server, "chat_prompt", lambda *args: {}["a bug"])
    code, answer = post(real.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    assert code == 500 and answer["error"]["type"] == "server_error" and "KeyError" in answer["error"]["message"]
    assert real.client.completions.create(model="x", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_an_engine_that_fails_says_so_and_refuses_work(tiny):
    """A bug in the engine's loop (not a request's failure): the request in flight gets a 500, /health a 503
    with status "error" (a supervisor's cue), and new requests a 503."""
    model, tokenizer = tiny
    engine = Engine(model, 2, 64)
    engine.join = lambda job: 1 / 0
    with serving(model, tokenizer, engine=engine) as url:
        code, answer = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert code == 500 and "the engine failed (ZeroDivisionError" in answer["error"]["message"]
        status, body = get(url, "/health")
        assert status == 503 and json.loads(body)["status"] == "error"
        code, answer = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert code == 503 and "restart the server" in answer["error"]["message"]


def test_tokenizing_runs_off_the_event_loop(real, monkeypatch):
    """A prompt that takes long to tokenize (a 30 MB one) leaves /health and the other requests answering."""
    for name, path, body in [("encode", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
                             ("chat_prompt", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                                      "max_tokens": 1})]:  # fmt: skip
        fast = getattr(real.tokenizer, name)
        monkeypatch.setattr(real.tokenizer, name, lambda *args, fast=fast: time.sleep(2) or fast(*args))
        thread = threading.Thread(target=post, args=(real.url, path, body))
        thread.start()
        time.sleep(0.3)
        start = time.monotonic()
        assert health(real.url)["status"] == "ok" and time.monotonic() - start < 1.0
        thread.join()
        monkeypatch.undo()


def test_stop_strings_take_linear_time():
    """Against a reference (the text up to where a stop string first ends), text cut anywhere into tokens; and
    stop strings of 10000 characters that every token keeps matched but for their end cost microseconds per
    token (trying each prefix of each cost a second per token)."""
    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("ab", k=rng.randint(0, 30)))
        ends = [n for n in range(len(text) + 1) if any(text[:n].endswith(stop) for stop in stops)]
        expected = text if not ends else text[: min(ends[0] - len(s) for s in stops if text[: ends[0]].endswith(s))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 4)))
        matcher, said, hit = StopStrings(stops), "", False
        for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
            ready, hit = matcher.push(text[a:b])
            said += ready
            if hit:
                break
        assert (said if hit else said + matcher.held) == expected, (stops, text)
    matcher, start = StopStrings(["ab" * 5000 + "c" + str(i) for i in range(4)]), time.perf_counter()
    for _ in range(6000):
        assert matcher.push("ab")[1] is False
    assert time.perf_counter() - start < 2.0 and len(matcher.held) == 10000


def test_only_the_servers_own_names_are_served(tiny):
    """The Host header names localhost, an IP address or a name given (--host, --allow-host): a page whose name
    was rebound to 127.0.0.1 gets a 403."""
    with serving(*tiny, context=64, hosts=[*LOCAL_NAMES, "gemma.lan"]) as url:
        port = url.rsplit(":", 1)[1]
        for host, status in [(f"localhost:{port}", 200), (f"127.0.0.1:{port}", 200), (f"[::1]:{port}", 200),
                             ("192.168.1.20", 200), (f"Gemma.LAN:{port}", 200), (f"evil.example:{port}", 403),
                             ("localhost.evil.example", 403), ("127.0.0.1.nip.io", 403), ("[::1", 403),
                             ("evil.example@localhost", 403), ("localhost/x", 403), ("localhost:x", 403)]:  # fmt: skip
            code, body = get(url, "/health", {"Host": host})
            assert code == status, (host, body)
        assert "evil.example" in json.loads(get(url, "/", {"Host": "evil.example"})[1])["error"]["message"]


def test_replies_end_at_the_default_limit_and_each_request_is_logged(tiny):
    """A request without max_tokens gets the server's default (serve.py --max-tokens); each request, refused or
    answered, streamed or whole, leaves one line: who, what, the status, its tokens and its time."""
    lines = []
    with serving(*tiny, context=64, max_tokens=3, log=lines.append) as url:
        code, answer = post(url, "/v1/completions", {"prompt": "Hi", "temperature": 0})
        assert code == 200 and answer["usage"]["completion_tokens"] == 3, answer
        assert answer["choices"][0]["finish_reason"] == "length"
        code, answer = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 5, "temperature": 0})
        assert answer["usage"]["completion_tokens"] == 5
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        chunks = list(client.completions.create(model="x", prompt="Hi", stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"
        assert post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 0})[0] == 400
        assert get(url, "/health", {"Host": "evil.example"})[0] == 403
        time.sleep(0.2)  # (a line is logged once its response has ended)
    prompt = len(tiny[1].encode("Hi")) + 1
    assert [re.sub(r"\d+\.\d\d s$", "T s", line) for line in lines] == [
        f'127.0.0.1 "POST /v1/completions" 200, {prompt} prompt + 3 reply tokens, T s',
        f'127.0.0.1 "POST /v1/completions" 200, {prompt} prompt + 5 reply tokens, T s',
        f'127.0.0.1 "POST /v1/completions" 200, {prompt} prompt + 3 reply tokens, T s',
        '127.0.0.1 "POST /v1/completions" 400, T s',
        '127.0.0.1 "GET /health" 403, T s',
    ]


def test_a_body_not_sent_as_json_is_told_so(tiny):
    """curl -d without -H 'Content-Type: application/json' sends a form: one line says what to send. A body
    with no Content-Type at all is read as JSON."""
    with serving(*tiny, context=64) as url:
        host, port = url.removeprefix("http://").split(":")
        for kind in ("application/x-www-form-urlencoded", "text/plain"):
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("POST", "/v1/completions", b'{"prompt": "Hi", "max_tokens": 1}', {"Content-Type": kind})
            response = conn.getresponse()
            message = json.loads(response.read())["error"]["message"]
            assert response.status == 400 and message == (
                f"the body must be JSON, sent with 'Content-Type: application/json' (this one came as '{kind}')"
            )
        conn = http.client.HTTPConnection(host, int(port), timeout=60)  # no Content-Type: read as JSON
        conn.request("POST", "/v1/completions", b'{"prompt": "Hi", "max_tokens": 1}')
        assert conn.getresponse().status == 200


def test_connections_are_limited_and_idle_ones_closed(tiny):
    """Beyond the limit a new connection is closed at once, logged once; one that sends no request head within
    the idle timeout (nothing, or a byte at a time) is closed; then the server answers again."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    with serving(*tiny, context=64, max_connections=3, idle_timeout=0.5) as url:
        logging.getLogger("uvicorn.error").addHandler(handler)  # (after uvicorn configured its loggers)
        try:
            address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
            idle = [socket.create_connection(address, timeout=5) for _ in range(3)]
            time.sleep(0.1)
            extra = [socket.create_connection(address, timeout=5) for _ in range(20)]
            assert all(closed(s) for s in extra)  # at once
            start = time.monotonic()
            assert all(closed(s) for s in idle) and time.monotonic() - start < 2  # when idle
            dribbler = socket.create_connection(address, timeout=5)
            with contextlib.suppress(OSError):
                for byte in b"GET /health HTTP/1.1\r\nHost: localhost\r\n":
                    dribbler.send(bytes([byte]))
                    time.sleep(0.05)
            assert closed(dribbler)
            assert health(url)["status"] == "ok"
        finally:
            logging.getLogger("uvicorn.error").removeHandler(handler)
    assert [r.getMessage() for r in records if "connections are open" in r.getMessage()] == [
        "3 connections are open, the most allowed (serve.py --max-connections): new ones are closed until some end"
    ]


def test_errors_name_the_field_in_param(real):
    for body, param, words in [(b'{"prompt": "Hi",', None, "not valid JSON"),
                               ({"prompt": "Hi", "temperature": 500}, "temperature", "temperature must be"),
                               ({"prompt": "Hi", "tools": [{}]}, "tools", "tools"),
                               ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages.0.content",
                                "messages.0.content: part 0 has type 'audio'")]:  # fmt: skip
        path = "/v1/completions" if isinstance(body, bytes) or "prompt" in body else "/v1/chat/completions"
        code, answer = post(real.url, path, body)
        assert code == 400 and answer["error"]["param"] == param and words in answer["error"]["message"], answer


async def tokens_of(jobs: list[Job]) -> list[list[int]]:
    """Each job's tokens, in order, until it ends."""
    replies = []
    for job in jobs:
        replies.append([])
        while (token := await job.tokens.get()) is not None:
            replies[-1].append(token)
    return replies


def test_the_engine_with_a_compiled_step(tiny_int4_dir):
    """--compile: the step compiles at warm_up for all rows (idle ones too), and requests joining it generate
    what the compiled step generates for each alone."""
    model = loader.from_pretrained(tiny_int4_dir)
    step = compile_decode_step(torch.device("cpu"))
    prompts = [[2, 17, 300, 45], [2, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    alone = [list(generate(model, p, 12, GREEDY, decode_step=step)) for p in prompts]
    engine = Engine(model, 2, 64, step, every_row=True)
    engine.warm_up()

    async def run() -> list[list[int]]:
        jobs = [Job(Request(p, 12, GREEDY), asyncio.get_running_loop()) for p in prompts]
        for job in jobs:
            engine.submit(job)
        return await tokens_of(jobs)

    engine.start()
    try:
        assert asyncio.run(run()) == alone
    finally:
        engine.stop()


def test_a_row_whose_sampling_fails_fails_alone_in_the_engine(tiny):
    """Two requests in the engine's rows; row 0's logits turn NaN at its 3rd decode step: that request ends
    with a 500 (its client gets an error), the other gets what it gets alone."""
    from test_generation import nan_logits_in_row_0

    model, _ = tiny
    sampled = Sampling(temperature=1.0, top_k=20)
    prompts = [[2, 17, 300, 45], [2, 8, 9, 10, 11, 12]]
    alone = list(generate(model, prompts[1], 12, GREEDY))
    engine = Engine(model, 2, 64, nan_logits_in_row_0(from_step=3))

    jobs = []

    async def run() -> list[list[int]]:
        jobs.extend([Job(Request(prompts[0], 12, sampled), asyncio.get_running_loop()),
                     Job(Request(prompts[1], 12, GREEDY), asyncio.get_running_loop())])  # fmt: skip
        for job in jobs:
            engine.submit(job)  # both queued before the engine starts: the first takes row 0
        engine.start()
        return await tokens_of(jobs)

    try:
        failed, other = asyncio.run(run())
    finally:
        engine.stop()
    assert jobs[0].error.status == 500 and "decoding failed: IndexError" in jobs[0].error.message
    assert len(failed) == 3
    assert jobs[1].error is None and other == alone
    assert engine.status()["active"] == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until_serving(proc: subprocess.Popen) -> str:
    """serve.py's stderr up to its "serving ..." line (all of it, if it ends first)."""
    said = ""
    while not said.endswith("\n") or not said.splitlines()[-1].startswith("serving"):
        line = proc.stderr.readline()
        if not line:
            return said
        said += line
    return said


def test_sigterm_ends_in_flight_streams_and_exits(tmp_path):
    """serve.py as users run it: "serving" is said once the port takes connections; a stream in flight when
    SIGTERM comes is finished or cut within the shutdown timeout, and the server exits 0."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", str(port), "--shutdown-timeout", "1"],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        said = until_serving(proc)
        assert "serving" in said and "note: gemma-3-270m is a base model, not instruction-tuned" in said
        health(url)  # at once
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model="x", prompt="Once upon a time", max_tokens=2000, stream=True)
        pieces = iter(stream)
        next(pieces)
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(openai.APIError, http.client.HTTPException, OSError):
            for _ in pieces:  # ends: cut by the shutdown
                pass
        # uvicorn exits by the signal it caught, once everything is closed: as a service manager expects
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


ENGINE_FAILS = """
import sys
sys.path.insert(0, {root!r})
import serve
from gemma3_int4 import engine
engine.Engine.join = lambda self, job: 1 / 0  # a bug in the engine's loop
sys.exit(serve.main(sys.argv[1:]))
"""


def test_serve_exits_1_when_it_cannot_serve(tiny_int4_dir, tmp_path):
    """A port that is taken: one line, before "serving". An engine that fails: the request in flight gets a 500,
    and the server exits 1 (for a supervisor to restart it) saying why."""
    command = [sys.executable, "-c", ENGINE_FAILS.format(root=str(ROOT)), "--model", str(tiny_int4_dir), "--port"]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        out = subprocess.run([*command, port], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "serving" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    port = str(free_port())
    proc = subprocess.Popen([*command, port], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in until_serving(proc)
        code, answer = post(f"http://127.0.0.1:{port}", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert code == 500 and "the engine failed" in answer["error"]["message"]
        assert proc.wait(timeout=30) == 1
        assert proc.stderr.read().strip().splitlines()[-1].startswith("error: the engine failed (ZeroDivisionError")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt install chromium)")
def test_the_chat_page_streams_a_reply_in_a_browser(real, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.getuid() == 0 else [])
        try:
            page = browser.new_page()
            page.goto(real.url + "/")
            page.wait_for_function("document.getElementById('title').textContent === 'gemma-3-270m'")
            page.fill("#max-tokens", "24")
            page.fill("#input", "Name a color.")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.user")
            page.wait_for_function("document.querySelector('.msg.assistant span').textContent.length > 0")
            page.wait_for_function("!document.getElementById('send').disabled", timeout=120_000)
            reply = page.text_content(".msg.assistant span")
            page.screenshot(path=str(tmp_path / "chat.png"))
            page.fill("#max-tokens", "400")
            page.fill("#input", "Now write a long story about a dragon, in many chapters.")  # the whole chat goes
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2")
            page.wait_for_function("document.querySelectorAll('.msg.assistant span')[1].textContent.length > 0")
            page.evaluate("document.getElementById('stop').click()")  # (a no-op if the reply is already over)
            page.wait_for_function("!document.getElementById('send').disabled", timeout=120_000)
            deadline = time.time() + 10
            while health(real.url)["active"] and time.time() < deadline:  # stopping frees the row
                time.sleep(0.05)
            assert health(real.url)["active"] == 0
            page.click("#new")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()
    assert reply.strip()  # sampled with Gemma's defaults: some text, not a known one
    assert (tmp_path / "chat.png").stat().st_size > 1000


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt install chromium)")
def test_the_chat_page_sends_an_image(tiny_vision, tmp_path):
    """A vision model's page offers an image: attached, it shows in the message and goes as a data: URL."""
    model, tokenizer = loader.from_pretrained(tiny_vision), Tokenizer.from_file(tiny_vision / "tokenizer.model")
    (tmp_path / "cat.png").write_bytes(image_file())
    with serving(model, tokenizer, context=128, name="tiny") as url:
        content = sent_from_the_page(url, [tmp_path / "cat.png"])
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,") and content[1]["text"] == "What is this?"


def test_the_chat_page_sends_audio_and_an_image(tiny_gemma4, tmp_path):
    """Gemma 4's page takes a WAV recording too: attached with an image, both go, in the order chosen, the
    recording as an input_audio part (its base64 WAV)."""
    wav = wav_bytes(speech_like(0.6), 16_000)
    (tmp_path / "a.wav").write_bytes(wav)
    (tmp_path / "cat.png").write_bytes(image_file())
    with serving(*tiny_gemma4, context=512, name="tiny4") as url:
        content = sent_from_the_page(url, [tmp_path / "a.wav", tmp_path / "cat.png"], "audio")
    audio = {"data": base64.b64encode(wav).decode(), "format": "wav"}
    assert content[0] == {"type": "input_audio", "input_audio": audio}
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,") and content[2]["text"] == "What is this?"


def sent_from_the_page(url: str, files: list[Path], shown: str = "img") -> list[dict]:
    """The content parts the chat page sends for "What is this?" with the files attached (the reply streamed
    without an error, the attachment shown in the message as an `shown` element)."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.getuid() == 0 else [])
        try:
            page = browser.new_page()
            sent = []
            page.on("request", lambda r: sent.append(r.post_data) if r.url.endswith("/chat/completions") else None)
            page.goto(url + "/")
            page.wait_for_selector("#attach-label:not([hidden])")
            page.set_input_files("#attach", [str(f) for f in files])
            names = ", ".join(f.name for f in files)
            page.wait_for_function(f"document.getElementById('attached').textContent === {names!r}")
            page.fill("#max-tokens", "8")
            page.fill("#input", "What is this?")
            page.press("#input", "Enter")
            page.wait_for_selector(f".msg.user {shown}")
            page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
            assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").text_content()
        finally:
            browser.close()
    return json.loads(sent[0])["messages"][0]["content"]
