"""Sampling and the decode loop, as free functions (gpt-fast style); generate.py and chat.py call them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from PIL import Image

from . import gemma4_audio, gemma4_vision, vision
from .attention import ALL, image_index
from .config import Gemma4VisionConfig
from .model import Gemma3

# The range of temperature (other than 0) and repetition_penalty: together they scale logits by at most 10^4, so
# finite logits stay finite (an overflow to infinity would make NaN, and sampling from NaN fails).
SCALES = (0.01, 100.0)


@dataclass
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the context

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        low, high = SCALES
        if self.temperature != 0 and not low <= self.temperature <= high:
            raise ValueError(f"temperature must be 0 (greedy) or from {low} to {high}, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be from {low} to {high}, got {self.repetition_penalty}")


GEMMA_SAMPLING = Sampling(temperature=1.0, top_k=64, top_p=0.95)  # Google's recommended settings for Gemma 3


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style, as in transformers: seen tokens' positive logits are divided by the penalty, negative multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample(
    logits: torch.Tensor, s: Sampling, seen: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits (B, V) float -> next token ids (B,)."""
    if seen is not None and s.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
    if s.temperature == 0:
        return logits.argmax(-1)
    logits, ids = logits / s.temperature, None
    if s.top_k and s.top_k < logits.shape[-1]:
        # Only the top k can be drawn (and the ties at the k-th, as transformers keeps them): the rest of the
        # work runs on those few candidates, not on the whole vocabulary (whose sort alone takes milliseconds).
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        candidates = int((logits >= kth).sum(-1).max())
        logits, ids = torch.topk(logits, candidates, dim=-1)  # (B, candidates), sorted: the best first
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.min_p:
        probs = probs.masked_fill(probs < s.min_p * probs.amax(-1, keepdim=True), 0.0)
    if s.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
    # Sampling via exponential races (Gumbel-max in disguise): no host sync, no renormalisation needed.
    race = torch.empty_like(probs).exponential_(generator=generator)
    choice = (probs / race).argmax(-1)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


def image_inputs(model: Gemma3, images: list[Image.Image]) -> tuple[torch.Tensor | list[torch.Tensor], list[int]]:
    """Images as the model takes them (pixel_values), and how many soft tokens each becomes in the prompt:
    Gemma 3's resized to one square (vision.py), stacked (N, 3, S, S); Gemma 4's each at its own size within the
    soft-token budget (gemma4_vision.py), a list of (3, H, W)."""
    vc = model.config.vision_config
    if isinstance(vc, Gemma4VisionConfig):
        pixels = [gemma4_vision.preprocess(image, vc.max_soft_tokens) for image in images]
        return pixels, [gemma4_vision.soft_tokens(p, vc) for p in pixels]
    return torch.stack([vision.preprocess(image, vc.image_size) for image in images]), [vc.tokens_per_image] * len(
        images
    )


def audio_inputs(recordings: list) -> tuple[list[torch.Tensor], list[int]]:
    """16 kHz recordings (gemma4_audio.load_audio) -> their log-mel features (frames, 128), and how many soft
    tokens each becomes in the prompt."""
    features = [gemma4_audio.log_mel(samples) for samples in recordings]
    if any(f.shape[0] == 0 for f in features):
        raise ValueError("a recording shorter than 20 ms holds no audio frame")
    return features, [gemma4_audio.soft_tokens(f.shape[0]) for f in features]


def prefill(
    model: Gemma3,
    ids: torch.Tensor,
    start: int = 0,
    chunk: int = 512,
    pixel_values: torch.Tensor | None = None,
    rows: slice = ALL,
) -> torch.Tensor:
    """Run the prompt (B, T) through the model at positions start.., filling the cache rows `rows` (all by
    default), about `chunk` tokens at a time (attention's (T, S) masks and activations stay small for long
    prompts); return the last logits (B, V). pixel_values (N, 3, S, S): the images whose soft tokens the prompt
    holds. A chunk never ends inside an image, whose tokens must see each other."""
    x = model.embed_tokens(ids, pixel_values)  # (B, T, D)
    vc = model.config.vision_config
    images = None if pixel_values is None or vc is None else image_index(ids == vc.image_token_id)
    inside_image = [False] * ids.shape[1]  # [j]: tokens j and j + 1 are the same image's, so no chunk ends at j
    if images is not None:
        inside_image = ((images[:, 1:] >= 0) & (images[:, 1:] == images[:, :-1])).any(0).tolist() + [False]
    i = 0
    while i < ids.shape[1]:
        end = min(i + chunk, ids.shape[1])
        while inside_image[end - 1]:
            end += 1
        pos = torch.arange(start + i, start + end, device=ids.device)
        h = model.hidden_states(x[:, i:end], pos, None if images is None else images[:, i:end], rows)
        i = end
    return model.logits(h[:, -1])


def decode_one_token(model: Gemma3, tokens: torch.Tensor, pos: torch.Tensor, rows: slice = ALL) -> torch.Tensor:
    """tokens (B, 1) at positions pos (B, 1), one per row of the cache rows `rows` -> logits (B, V). The
    fixed-shape step that --compile compiles."""
    return model(tokens, pos, rows=rows)[:, -1]


class Scores(NamedTuple):
    """A sequence's tokens from some start on, each scored given the tokens before it (float32, on the CPU)."""

    logprobs: torch.Tensor  # (n,): each token's log-probability
    top_logprobs: torch.Tensor  # (n, k): the k most likely tokens' log-probabilities at each position, largest first
    top_ids: torch.Tensor  # (n, k): those tokens


@torch.no_grad()
def score(model: Gemma3, sequences: list[list[int]], starts: list[int], top: int = 1, chunk: int = 256) -> list[Scores]:
    """Score the tokens sequence[start:] (start >= 1) of each sequence: one plain forward of the batch, padded at
    the end (no cache), and the vocabulary's log-softmax `chunk` positions at a time (a position's is 1 MB at
    Gemma's 262k tokens). For lm-evaluation-harness (harness.py) and /v1/completions' logprobs."""
    T = max(len(s) for s in sequences)
    ids = torch.tensor([s + [0] * (T - len(s)) for s in sequences], device=model.norm.weight.device)
    h = model.hidden_states(model.embed_tokens(ids))  # (B, T, D)
    out = []
    for row, (s, start) in enumerate(zip(sequences, starts, strict=True)):
        pieces = []
        for i in range(start, len(s), chunk):  # position j - 1 predicts token j
            targets = ids[row, i : min(i + chunk, len(s))]
            lp = torch.log_softmax(model.logits(h[row, i - 1 : i - 1 + len(targets)]).float(), dim=-1)  # (n, V)
            best = lp.topk(top, dim=-1)
            pieces.append((lp.gather(-1, targets[:, None])[:, 0], best.values, best.indices))
        out.append(Scores(*(torch.cat(parts).cpu() for parts in zip(*pieces, strict=True))))
    return out


def compile_decode_step(device: torch.device, model: torch.nn.Module | None = None) -> Callable:
    """decode_one_token through torch.compile: inductor on CPU, CUDA graphs on GPU. Its shapes never change
    while the cache is reused (positions are tensors, not Python ints), so it compiles once, as one graph;
    but a mixture of experts' dispatch (gemma4.Experts, which depends on the chosen experts) runs eagerly
    between the graphs."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    one_graph = not getattr(getattr(model, "config", None), "num_experts", None)
    return torch.compile(decode_one_token, mode=mode, fullgraph=one_graph, dynamic=False)


@dataclass(eq=False)
class Request:
    """One sequence to generate, in a row of a Batch: its prompt, how to sample, and what it has generated."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: tuple[int, ...] = ()
    generator: torch.Generator | None = None
    pixel_values: torch.Tensor | None = None  # (N, 3, S, S): the images whose soft tokens prompt[start:] holds
    start: int = 0  # the row's cache already holds prompt[:start] (a chat's earlier turns)
    tokens: list[int] = field(default_factory=list)  # generated so far
    finish_reason: str | None = None  # "stop": a stop id (the last token); "length": max_new_tokens or the context;
    # "error": sampling its next token failed (error says why)
    error: Exception | None = None


class Batch:
    """Continuous batching, as vLLM does it: each row of the model's KV cache is a slot for one sequence.
    A request joins a free row between decode steps, its prompt prefilled on its own (`add`); each `step` then
    decodes one token for every active row, each at its own position; a finished request frees its row at once.

    Eager, a step runs the rows up to the last active one (fewer rows, less work); with a compiled decode step,
    all rows (one fixed shape, compiled once; idle rows compute what no one reads). generate() is a batch of one.
    """

    def __init__(self, model: Gemma3, decode_step: Callable = decode_one_token, every_row: bool = False):
        """every_row: step all rows always, as a compiled decode_step needs (compile_decode_step)."""
        if model.cache_len == 0:
            raise RuntimeError("call setup_cache(batch_size, max_seq_len) before batching")
        self.model, self.decode_step, self.every_row = model, decode_step, every_row
        n, device = model.cache_batch, model.norm.weight.device
        self.requests: list[Request | None] = [None] * n
        self.tokens = torch.zeros(n, 1, dtype=torch.long, device=device)  # each row's next input token
        self.pos = torch.zeros(n, 1, dtype=torch.long, device=device)  # and its position
        self.seen = torch.zeros(n, model.config.vocab_size, dtype=torch.bool, device=device)  # repetition penalty

    def free_rows(self) -> list[int]:
        return [row for row, request in enumerate(self.requests) if request is None]

    def active(self) -> list[Request]:
        return [request for request in self.requests if request is not None]

    @torch.no_grad()
    def add(self, request: Request) -> None:
        """Prefill the request's prompt into the first free row and sample its first token."""
        prompt, context = request.prompt, self.model.cache_len
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= context:
            raise ValueError(f"the prompt has {len(prompt)} tokens, but the context is {context} tokens")
        row = self.free_rows()[0]
        ids = torch.tensor([prompt], device=self.tokens.device)
        logits = prefill(self.model, ids[:, request.start :], request.start, pixel_values=request.pixel_values,
                         rows=slice(row, row + 1))  # fmt: skip
        self.requests[row] = request
        self.seen[row] = False
        self.seen[row, ids[0]] = True
        self.accept(row, logits)

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Decode one token for every active row; return the requests that got one, or failed (in row order).
        A row whose sampling fails (NaN logits, say) fails alone: its request finishes with the error."""
        active = [row for row, request in enumerate(self.requests) if request is not None]
        if not active:
            return []
        n = len(self.requests) if self.every_row else active[-1] + 1
        rows = ALL if n == len(self.requests) else slice(0, n)
        logits = self.decode_step(self.model, self.tokens[:n], self.pos[:n], rows)
        requests = [self.requests[row] for row in active]
        for row in active:
            try:
                self.accept(row, logits[row : row + 1])
            except Exception as e:  # this row's logits or sampling: the other rows' tokens are still good
                self.fail(self.requests[row], e)
        return requests

    def fail(self, request: Request, error: Exception) -> None:
        """Finish the request with the error and free its row; its tokens so far stay with it."""
        request.finish_reason, request.error = "error", error
        self.remove(request)

    def remove(self, request: Request) -> None:
        """Free the request's row (a client that went away); its tokens so far stay with it."""
        row = self.requests.index(request)
        self.requests[row] = None
        self.pos[row] = 0  # an idle row decodes at position 0: it makes eager steps read no further

    def accept(self, row: int, logits: torch.Tensor) -> None:
        """Sample the row's next token from its logits (1, V); finish the request, or feed the token back."""
        request = self.requests[row]
        token = sample(logits, request.sampling, self.seen[row : row + 1], request.generator)
        token_id = int(token)
        request.tokens.append(token_id)
        length = len(request.prompt) + len(request.tokens)  # the token goes at position length - 1
        if token_id in request.stop_ids:
            request.finish_reason = "stop"
        elif len(request.tokens) == request.max_new_tokens or length == self.model.cache_len:
            request.finish_reason = "length"
        if request.finish_reason is not None:
            self.remove(request)
            return
        self.seen[row, token_id] = True
        self.tokens[row, 0] = token_id
        self.pos[row, 0] = length - 1


@torch.no_grad()
def generate(
    model: Gemma3,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    stop_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    decode_step: Callable = decode_one_token,
    pixel_values: torch.Tensor | None = None,
    start: int = 0,
) -> Iterator[int]:
    """Yield new token ids one at a time; stop after a stop id (which is yielded) or max_new_tokens.
    pixel_values (N, 3, S, S): the images whose soft tokens prompt[start:] holds (Tokenizer.encode makes them).

    Sets up a KV cache for len(prompt) + max_new_tokens positions unless the model has one big enough;
    the prompt must fit in the model's context, and generation stops at its end. start > 0: the cache
    already holds prompt[:start] (a chat's earlier turns), so only the rest is prefilled, and the cache's
    length is the context.
    """
    context = model.config.max_seq_len
    if start:
        if model.cache_batch != 1 or not start < len(prompt) <= model.cache_len:
            raise ValueError(f"continuing at {start} needs a batch-1 cache holding the {len(prompt)}-token prompt")
        context = model.cache_len
    if len(prompt) >= context:
        raise ValueError(f"the prompt has {len(prompt)} tokens, but the model's context is {context} tokens")
    needed = len(prompt) + min(max_new_tokens, context - len(prompt))
    if model.cache_len < needed or model.cache_batch != 1:  # else reuse it: same shapes, no recompiling
        model.setup_cache(1, min(context, -(-needed // 1024) * 1024))  # whole KiB of tokens: fewer new shapes
    request = Request(prompt, max_new_tokens, sampling, stop_ids, generator, pixel_values, start)
    batch = Batch(model, decode_step)
    batch.add(request)
    yield request.tokens[-1]
    while request.finish_reason is None:
        batch.step()
        if request.error is not None:
            raise request.error
        yield request.tokens[-1]


def generate_batch(
    model: Gemma3,
    requests: list[Request],
    rows: int,
    context: int,
    decode_step: Callable = decode_one_token,
    every_row: bool = False,
) -> Iterator[Request]:
    """Run the requests through a Batch of `rows` rows with a `context`-token cache each, each joining as soon as
    a row is free; yield each request as it finishes (a prompt that does not fit raises before anything runs; a
    request whose sampling fails finishes with its error, the others go on)."""
    for request in requests:
        if not 0 < len(request.prompt) < context:
            raise ValueError(f"a prompt has {len(request.prompt)} tokens: it must have 1 to {context - 1}")
    model.setup_cache(rows, context)
    batch, waiting = Batch(model, decode_step, every_row), list(requests)
    while waiting or batch.active():
        while waiting and batch.free_rows():
            request = waiting.pop(0)
            batch.add(request)
            if request.finish_reason is not None:  # done at its first token
                yield request
        yield from (request for request in batch.step() if request.finish_reason is not None)
