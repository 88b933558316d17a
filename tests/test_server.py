"""serve.py's server on loopback, driven by the official openai client: chat and completions (streamed and
whole) against generate() on the same prompt, stop strings, concurrent streams each as it is alone, every kind
of bad request, a dropped stream, a full queue, the API key, images, shutdown, and the chat page in a browser."""

import asyncio
import base64
import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import hf_multimodal_model, int4_checkpoint
from PIL import Image

import loader
import vision
from checkpoint import DEFAULT_MODEL
from config import BOS_ID, STOP_IDS
from generation import Request, Sampling, compile_decode_step, generate
from server import Engine, Job, build_app
from tokenizer import Tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
GREEDY = Sampling(temperature=0)


@contextlib.contextmanager
def serving(model, tokenizer, slots=8, context=512, max_queue=64, api_key=None, name="gemma-3-270m",
            max_body=2**20):  # fmt: skip
    """The app on a free loopback port, in a thread: yields its base URL."""
    engine = Engine(model, slots, context, max_queue=max_queue)
    app = build_app(engine, tokenizer, name, api_key, max_body)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
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
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
        400,
        "data: URLs",
    ),  # fmt: skip
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}],
                }
            ]
        },
        400,
        "not a readable image",
    ),  # fmt: skip
]


@pytest.mark.parametrize("body, status, words", BAD)
def test_bad_requests_get_openai_errors(real, body, status, words):
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    code, answer = post(real.url, path, body)  # (json.dumps writes the lone surrogate as \\udce9)
    assert code == status and set(answer["error"]) >= {"message", "type", "param"}
    assert words.lower() in answer["error"]["message"].lower(), answer


def test_a_body_over_the_limit_is_refused(real):
    body = {"messages": [{"role": "user", "content": "x" * 2**20}]}  # the test server takes 1 MiB
    code, answer = post(real.url, "/v1/chat/completions", body)
    assert code == 413 and set(answer["error"]) >= {"message", "type", "param"}
    conn = http.client.HTTPConnection(*real.url[7:].split(":"), timeout=10)  # a chunked body: no length to check
    conn.request("POST", "/v1/completions", iter([b'{"prompt": "Hi"}']), {"Content-Type": "application/json"},
                 encode_chunked=True)  # fmt: skip
    response = conn.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]["message"]


def test_non_finite_sampling_values_are_refused(real):
    for value in (b"NaN", b"Infinity"):  # Python's json reads them; they must not reach the sampler
        body = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + value + b"}"
        code, answer = post(real.url, "/v1/chat/completions", body)
        assert code == 400 and "temperature" in answer["error"]["message"]


def test_an_image_for_a_text_only_model(real):
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What is this?"}]}]}  # fmt: skip
    code, answer = post(real.url, "/v1/chat/completions", body)
    assert code == 400 and "text-only" in answer["error"]["message"]


def health(url: str) -> dict:
    with contextlib.closing(http.client.HTTPConnection(*url[7:].split(":"), timeout=10)) as conn:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())


def test_a_dropped_stream_frees_its_row(real):
    host, port = real.url[7:].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    data = 0
    while data < 3:  # the opening chunk, then two of the reply's: it has a row and decodes
        data += response.readline().startswith(b"data: ")
    assert health(real.url)["active"] == 1
    response.close()
    conn.close()
    deadline = time.time() + 10
    while health(real.url)["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert health(real.url)["active"] == 0  # freed long before its 400 tokens
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
        assert health(url)["status"] == "ok"  # /health and the page need no key


def png_bytes(size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 60).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


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
    png = png_bytes()
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
        replies = []
        for job in jobs:
            replies.append([])
            while (token := await job.tokens.get()) is not None:
                replies[-1].append(token)
        return replies

    engine.start()
    try:
        assert asyncio.run(run()) == alone
    finally:
        engine.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_ends_in_flight_streams_and_exits(tmp_path):
    """serve.py as users run it: a stream in flight when SIGTERM comes is finished or cut within the shutdown
    timeout, and the server exits 0."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", str(port), "--shutdown-timeout", "1"],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            with contextlib.suppress(OSError):
                health(url)
                break
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.2)
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
    playwright = pytest.importorskip("playwright.sync_api")
    model, tokenizer = loader.from_pretrained(tiny_vision), Tokenizer.from_file(tiny_vision / "tokenizer.model")
    (tmp_path / "cat.png").write_bytes(png_bytes())
    with serving(model, tokenizer, context=128, name="tiny") as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.getuid() == 0 else [])
        try:
            page = browser.new_page()
            sent = []
            page.on("request", lambda r: sent.append(r.post_data) if r.url.endswith("/chat/completions") else None)
            page.goto(url + "/")
            page.wait_for_selector("#image-label:not([hidden])")
            page.set_input_files("#image", str(tmp_path / "cat.png"))
            page.wait_for_function("document.getElementById('attached').textContent === 'cat.png'")
            page.fill("#max-tokens", "8")
            page.fill("#input", "What is this?")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.user img")
            page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
            assert page.locator(".msg.error").count() == 0
        finally:
            browser.close()
    content = json.loads(sent[0])["messages"][0]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,") and content[1]["text"] == "What is this?"
