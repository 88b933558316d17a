"""OpenAI's API as this server reads and writes it: what server.py's routes are made of.

Read in order: the request bodies (pydantic models of OpenAI's chat and completions APIs, strictly typed), a chat
as a prompt (Gemma's template; images only as data: URLs, recordings as base64 WAV, both decoded here and checked
by size first), a completion's prompt, stop strings (matched in time linear in their length), and the replies'
pieces: a token as text, the logprobs (and echo) payload of a completion, and the server-sent events of a stream.
Every refusal is an APIError (a 400 naming the field).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import io
import json
import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
from fastapi.sse import format_sse_event
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import gemma4_audio, vision
from .config import BOS_ID
from .engine import APIError
from .generation import GEMMA_SAMPLING, Sampling, audio_inputs, image_inputs, score
from .model import Gemma3
from .tokenizer import AUDIO_MARK, IMAGE_MARK, Tokenizer

# ---------------------------------------------------------------------------------------------------
# Request bodies: OpenAI's fields, strictly typed (a string where a number goes is an error, not a guess).
# Unknown fields are ignored, as OpenAI-compatible servers do. Sampling defaults are Gemma's.


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str
    detail: str | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(Strict):
    data: str  # base64
    format: str


class AudioPart(Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


PART_TYPES = ("text", "image_url", "input_audio")


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def known_parts(cls, content: Any) -> Any:
        """An unknown part's type, named (else pydantic reports the union's first member: 'not a string')."""
        for i, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                known = ", ".join(map(repr, PART_TYPES))
                raise ValueError(f"part {i} has type {kind!r}: the parts this server reads are {known}")
        return content


class StreamOptions(Strict):
    include_usage: bool = False


Finite = Annotated[float, Field(allow_inf_nan=False)]
MAX_STOP_CHARS = 4096
MAX_LOGPROBS = 20


class Completion(Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: Finite | None = Field(None, ge=0)
    top_p: Finite | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: Finite | None = Field(None, ge=0, lt=1)
    repetition_penalty: Finite | None = Field(None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    prompt: str | list[int] | list[str] | list[list[int]] = ""  # several (/v1/completions): a choice each
    # /v1/completions, whole (not streamed): each token's log-probability and the `logprobs` most likely tokens'
    # (0 to 20; echo: the prompt's tokens' too, and the text), as OpenAI's legacy completions API answers them
    echo: bool = False
    # What this server cannot do: refused (unsupported) rather than silently ignored, as OpenAI does.
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    def unsupported(self) -> None:
        """A 400 naming the first field that asks for what this server cannot do."""
        scored = not isinstance(self, ChatCompletion) and not self.stream
        several = isinstance(self.prompt, list) and any(isinstance(p, (str, list)) for p in self.prompt)
        asked = {
            "logprobs": self.logprobs not in (None, False) and not (scored and 0 <= self.logprobs <= MAX_LOGPROBS),
            "echo": self.echo and not scored,
            "prompt": several and not scored,  # several prompts: whole only
            "top_logprobs": bool(self.top_logprobs),
            "tools": bool(self.tools),
            "response_format": (self.response_format or {}).get("type", "text") != "text",
        }
        field = next((field for field, asked_for in asked.items() if asked_for), None)
        if field is not None:
            raise APIError(400, f"{field}: not supported by this server (it replies with plain text)", param=field)

    def settings(self) -> tuple[Sampling, list[str]]:
        """How to sample and where to stop, checked (400s) before any work is done. Sampling is Gemma's
        recommended (GEMMA_SAMPLING) where the request says nothing."""
        self.unsupported()
        given = {name: getattr(self, name) for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
        try:
            sampling = dataclasses.replace(GEMMA_SAMPLING, **{k: v for k, v in given.items() if v is not None})
        except ValueError as e:  # (Sampling's messages begin with the field's name)
            raise APIError(400, str(e), param=str(e).split()[0]) from None
        return sampling, self.stops()

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 16 or "" in stops or sum(map(len, stops)) > MAX_STOP_CHARS:
            raise APIError(400, f"stop: at most 16 strings, none empty, {MAX_STOP_CHARS} characters in all",
                           param="stop")  # fmt: skip
        return stops


class ChatCompletion(Completion):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ---------------------------------------------------------------------------------------------------
# A chat as a prompt: Gemma's template (tokenizer.chat_prompt) with the images and recordings in their places.


def chat_prompt(messages: list[Message], tokenizer: Tokenizer, model: Gemma3, context: int) -> tuple[list[int], list]:
    """The prompt's ids, and its media (Job.media): Gemma 3's images in order, at the model's size; Gemma 4's images
    and then its recordings, each kind in order, preprocessed (generation.image_inputs, audio_inputs: how many soft
    tokens each becomes makes the prompt). System (and developer) messages come first and become Gemma's system
    prompt. Media are decoded last, once the model is known to take them (and Gemma 3's context to hold them)."""
    system = []
    while messages and messages[0].role in ("system", "developer"):
        text, media = parts_of(messages[0])
        if media:
            raise APIError(400, "messages[0]: system messages are text only", param="messages")
        system.append(text)
        messages = messages[1:]
    if not messages:
        raise APIError(400, "messages: a chat needs a user message after the system messages", param="messages")
    turns, urls, recordings = [], [], []
    for i, m in enumerate(messages):
        if m.role in ("system", "developer"):
            raise APIError(400, f"messages[{i}]: system messages go before the chat", param="messages")
        text, media = parts_of(m)
        images = [p.image_url.url for p in media if p.type == "image_url"]
        audio = [p.input_audio for p in media if p.type == "input_audio"]
        role = "user" if m.role == "user" else "model"  # "audio": the recordings' soft-token counts, once decoded
        turns.append({"role": role, "content": text, "images": len(images), "audio": len(audio)})
        urls += images
        recordings += audio
    if urls and model.vision is None:
        what = "is text-only" if getattr(model, "audio", None) is None else "has no vision tower"
        raise APIError(400, f"this model {what}: images need Gemma 3 4B, 12B or 27B, or Gemma 4's vision tower",
                       param="messages")  # fmt: skip
    if recordings and getattr(model, "audio", None) is None:
        raise APIError(400, "this model has no audio tower: audio needs Gemma 4 E2B or E4B", param="messages")
    if isinstance(model, Gemma3):  # 256 soft tokens an image: checked before any is decoded
        tokens_per_image = model.config.vision_config.tokens_per_image if model.vision else 0
        if len(urls) * tokens_per_image >= context:
            raise APIError(400, f"{len(urls)} images take {len(urls) * tokens_per_image} tokens, but the context is "
                           f"{context} tokens (serve.py --context)", param="messages")  # fmt: skip
        size = model.config.vision_config.image_size if model.vision else 0
        media = [decode_image(url, functools.partial(vision.resize, size=size)) for url in urls]
        image_counts, audio_counts = [tokens_per_image] * len(urls), []
    else:  # Gemma 4's soft tokens are counted as each image is decoded: decoding stops once they overflow
        pixels, image_counts = [], []
        for i, url in enumerate(urls):
            (image,), (n,) = decode_image(url, lambda full: image_inputs(model, [full]))
            pixels.append(image)
            image_counts.append(n)
            if sum(image_counts) >= context:
                raise APIError(400, f"{i + 1} of the {len(urls)} images take {sum(image_counts)} soft tokens, but the "
                               f"context is {context} tokens (serve.py --context)", param="messages")  # fmt: skip
        try:
            features, audio_counts = audio_inputs([decode_audio(audio) for audio in recordings])
        except ValueError as e:  # (a recording too short for a frame)
            raise APIError(400, f"input_audio: {e}", param="messages") from None
        media, heard = pixels + features, iter(audio_counts)
        for turn in turns:
            turn["audio"] = [next(heard) for _ in range(turn["audio"])]
    try:
        ids = tokenizer.chat_prompt(turns, "\n\n".join(system) or None, image_counts)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    if media and len(ids) >= context:
        raise APIError(400, f"the prompt has {len(ids)} tokens, {sum(image_counts) + sum(audio_counts)} of them the "
                       f"soft tokens of {len(urls)} image(s) and {len(recordings)} recording(s), but the context is "
                       f"{context} tokens (serve.py --context)", param="messages")  # fmt: skip
    return ids, media


def parts_of(message: Message) -> tuple[str, list[ImagePart | AudioPart]]:
    """A message's text, with a mark where each image part (or audio part) is, and those parts."""
    if message.content is None or isinstance(message.content, str):
        return message.content or "", []
    text, media = "", []
    for part in message.content:
        if part.type == "text":
            text += part.text
        else:
            media.append(part)
            text += IMAGE_MARK if part.type == "image_url" else AUDIO_MARK
    return text, media


FULL_SIZE = threading.Lock()  # held while an image (or a recording) is in memory at full size (decode_image)
WEB_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what browsers show (Pillow reads more: EPS through Ghostscript)


def decode_image(url: str, prepare: Callable[[Image.Image], Any]) -> Any:
    """An image from a data: URL (base64), prepared for the model (`prepare`: resized, or preprocessed). Nothing is
    fetched from the network. Its size is checked before it is decoded (Pillow's MAX_IMAGE_PIXELS, about 89
    megapixels, an error here), and it is prepared at once; requests take turns, so that the server holds one
    image at full size at a time (up to a few hundred MB: a PNG of 300 kB can decode to 89 megapixels). Only the
    formats browsers show are read."""
    header, comma, data = url.partition(",")
    if not (url.startswith("data:") and comma and header.endswith(";base64")):
        raise APIError(400, "image_url: only data: URLs with base64 data are accepted (the server fetches nothing)",
                       param="messages")  # fmt: skip
    try:
        raw = base64.b64decode(data, validate=True)
        with FULL_SIZE:
            image = vision.load_image(io.BytesIO(raw), "image_url", Image.MAX_IMAGE_PIXELS, WEB_FORMATS)
            image = prepare(image)  # (which frees the full-size one before the next is decoded)
    except binascii.Error as e:
        raise APIError(400, f"image_url: not base64 ({e})", param="messages") from None
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    return image


def decode_audio(audio: InputAudio) -> np.ndarray:
    """A recording from an input_audio part: base64 WAV (gemma4_audio.load_audio) -> 16 kHz samples, at most
    gemma4_audio.MAX_SECONDS long (what the tower hears; the body's size bounds the decoding). Decoded in turns
    with images (FULL_SIZE): a WAV of 8-bit samples becomes 8 times its size in float64 while it is read."""
    if audio.format != "wav":
        raise APIError(400, f"input_audio: format {audio.format!r} is not read; send WAV (format 'wav')",
                       param="messages")  # fmt: skip
    try:
        raw = base64.b64decode(audio.data, validate=True)
        with FULL_SIZE:
            samples = gemma4_audio.load_audio(io.BytesIO(raw), "input_audio")
    except binascii.Error as e:
        raise APIError(400, f"input_audio: not base64 ({e})", param="messages") from None
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    seconds = len(samples) / gemma4_audio.SAMPLE_RATE
    if seconds > gemma4_audio.MAX_SECONDS:
        raise APIError(400, f"input_audio: {seconds:.1f} s of audio, more than the {gemma4_audio.MAX_SECONDS} s "
                       "allowed", param="messages")  # fmt: skip
    return samples


def completion_prompt(prompt: str | list[int], tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """/v1/completions' prompt as ids: a string after <bos>, or the ids given (checked)."""
    if isinstance(prompt, list):
        if any(not 0 <= t < vocab_size for t in prompt):
            raise APIError(400, f"prompt: token ids go from 0 to {vocab_size - 1}", param="prompt")
        return prompt
    try:
        return [BOS_ID, *tokenizer.encode(prompt)]
    except ValueError as e:
        raise APIError(400, f"prompt: {e}", param="prompt") from None


# ---------------------------------------------------------------------------------------------------
# Stop strings: text is held back while it could still be the start of one.


class StopStrings:
    """The generated text, cut before the first stop string. Each stop string is matched as Knuth, Morris and
    Pratt do: `matched[i]` is the length of the longest prefix of stop i that the text ends with, and each new
    character updates it in constant time (amortized) with the stop's table of borders, however long the stops.
    Text is held back while it could be the start of a stop string: the last max(matched) characters."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""
        self.borders = [borders(stop) for stop in stops]
        self.matched = [0] * len(stops)

    def push(self, text: str) -> tuple[str, bool]:
        """Add generated text; return what may be sent now, and whether a stop string ended the text (which
        leaves the stop string and everything after it out)."""
        self.held += text
        for end in range(len(self.held) - len(text) + 1, len(self.held) + 1):  # each new character, ending at `end`
            char, starts = self.held[end - 1], []
            for i, (stop, border) in enumerate(zip(self.stops, self.borders, strict=True)):
                m = self.matched[i]
                while m and stop[m] != char:
                    m = border[m - 1]
                m = self.matched[i] = m + (stop[m] == char)
                if m == len(stop):
                    starts.append(end - m)
            if starts:  # the first stop string to end here (the longest, if several do)
                return self.held[: min(starts)], True
        keep = max(self.matched, default=0)
        ready, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return ready, False


def borders(s: str) -> list[int]:
    """Knuth-Morris-Pratt's table: [j] is the length of the longest proper prefix of s[: j + 1] that is also its
    suffix (where a partial match of s can go on after a mismatch)."""
    table, k = [0] * len(s), 0
    for j in range(1, len(s)):
        while k and s[j] != s[k]:
            k = table[k - 1]
        k += s[j] == s[k]
        table[j] = k
    return table


# ---------------------------------------------------------------------------------------------------
# The replies' pieces: tokens as text, log-probabilities, and server-sent events.


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token as text: its piece, spaces as spaces (a byte piece stays <0x..>, a control token its name)."""
    return tokenizer.sp.id_to_piece(token).replace("\u2581", " ") if token < tokenizer.vocab_size else ""


def logprobs(model: Gemma3, tokenizer: Tokenizer, prompt: list[int], generated: list[int], echo: bool,
         top: int) -> dict:  # fmt: skip
    """OpenAI's logprobs object of a completion: the tokens (the prompt's too with echo; its first has none),
    each one's log-probability, the `top` most likely at each position (at least the best: what tells whether
    the token was the greedy choice), and where each token's text starts. Scored by a plain forward of the
    whole sequence, in the calling thread, beside the engine's."""
    ids = prompt + generated
    first = 1 if echo else len(prompt)
    scores = score(model, [ids], [first], max(top, 1))[0] if first < len(ids) else None
    n = len(ids) - first
    token_logprobs = ([None] if echo else []) + (scores.logprobs.tolist() if n else [])
    top_logprobs = [None] if echo else []
    for i in range(n):
        pairs = zip(scores.top_ids[i].tolist(), scores.top_logprobs[i].tolist(), strict=True)
        top_logprobs.append({token_text(tokenizer, t): lp for t, lp in pairs})
    tokens = [token_text(tokenizer, t) for t in (ids if echo else generated)]
    offsets = [0 if echo else len(tokenizer.decode(prompt))]
    for t in tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets[: len(tokens)]}  # fmt: skip


def chunk(head: dict, chat: bool, piece: str | None, finish_reason: str | None = None) -> bytes:
    """A streamed reply's event: a piece of its text ("" first: a chat's role; None last, with finish_reason)."""
    if chat:
        delta = {} if piece is None else {"content": piece} if piece else {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    return sse({**head, "object": obj, "choices": [choice]})


def usage(result: dict) -> dict:
    """OpenAI's usage object of a reply, from its result (server.Routes.respond)."""
    prompt, completion = result["prompt_tokens"], result["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict) -> bytes:
    return format_sse_event(data_str=json.dumps(payload, ensure_ascii=False))
