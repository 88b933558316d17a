"""Sampling and the decode loop, as free functions (gpt-fast style); generate.py and chat.py call them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from model import Gemma3, image_index


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
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


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
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
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
    return (probs / race).argmax(-1)


def prefill(
    model: Gemma3, ids: torch.Tensor, start: int = 0, chunk: int = 512, pixel_values: torch.Tensor | None = None
) -> torch.Tensor:
    """Run the prompt (B, T) through the model at positions start.., filling the cache, about `chunk` tokens
    at a time (attention's (T, S) masks and activations stay small for long prompts); return the last logits
    (B, V). pixel_values (N, 3, S, S): the images whose soft tokens the prompt holds. A chunk never ends
    inside an image, whose tokens must see each other."""
    x = model.embed_tokens(ids, pixel_values)  # (B, T, D)
    images = None if pixel_values is None else image_index(ids == model.config.vision_config.image_token_id)
    inside_image = [False] * ids.shape[1]  # [j]: tokens j and j + 1 are the same image's, so no chunk ends at j
    if images is not None:
        inside_image = ((images[:, 1:] >= 0) & (images[:, 1:] == images[:, :-1])).any(0).tolist() + [False]
    i = 0
    while i < ids.shape[1]:
        end = min(i + chunk, ids.shape[1])
        while inside_image[end - 1]:
            end += 1
        pos = torch.arange(start + i, start + end, device=ids.device)
        h = model.hidden_states(x[:, i:end], pos, None if images is None else images[:, i:end])
        i = end
    return model.logits(h[:, -1])


def decode_one_token(model: Gemma3, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """token (B, 1) at position pos (1,) -> logits (B, V). The fixed-shape step that --compile compiles."""
    return model(token, pos)[:, -1]


def compile_decode_step(device: torch.device) -> Callable:
    """decode_one_token through torch.compile: inductor on CPU, CUDA graphs on GPU. Its shapes never change
    while the cache is reused (positions are tensors, not Python ints), so it compiles once."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(decode_one_token, mode=mode, fullgraph=True, dynamic=False)


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
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) >= context:
        raise ValueError(f"the prompt has {len(prompt)} tokens, but the model's context is {context} tokens")
    max_new_tokens = min(max_new_tokens, context - len(prompt))
    device = model.norm.weight.device
    needed = len(prompt) + max_new_tokens
    if model.cache_len < needed or model.cache_batch != 1:  # else reuse it: same shapes, no recompiling
        model.setup_cache(1, min(context, -(-needed // 1024) * 1024))  # whole KiB of tokens: fewer new shapes
    ids = torch.tensor([prompt], device=device)
    seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=device)
    seen[0, ids[0]] = True
    logits = prefill(model, ids[:, start:], start, pixel_values=pixel_values)
    for i in range(max_new_tokens):
        token = sample(logits, sampling, seen, generator)
        token_id = int(token)
        yield token_id
        if token_id in stop_ids or i == max_new_tokens - 1:
            return
        seen[0, token] = True
        logits = decode_step(model, token.view(1, 1), torch.tensor([len(prompt) + i], device=device))
