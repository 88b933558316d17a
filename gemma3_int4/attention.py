"""Attention's bookkeeping, shared by both decoders (model.py's Gemma 3, gemma4.py's Gemma 4): the masks, the
static KV cache and its ring buffers, and attend.

Read in order: the dtype attention computes in; the masks (causal, sliding window, the tokens of one image seen
both ways); one layer's KV cache, a ring buffer on the sliding layers; which positions the cache slots hold; the
two calls a decoder makes, allocate_caches (once) and attention_masks (each forward: the masks and key positions
for its positions `pos` in the cache rows `rows`, and the rings' bookkeeping); and attend, which reads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype attention computes and caches in: PyTorch's CPU attention is several times faster in float32
    than in bf16, so float32 there; elsewhere the activations' own."""
    return torch.float32 if device.type == "cpu" else dtype


def attention_mask(
    q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None = None, same_image: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, 1, T, S) bool for queries at q_pos (B, T) and keys at kv_pos (B, S), True where query i may attend to
    key j: causal, or either way between tokens of one image (same_image, (B, T, S)); and, if a window is given,
    not more than window - 1 tokens back (so an image token sees its image's later tokens however far, as in
    transformers). Each row of the batch has its own positions."""
    dist = q_pos[:, :, None] - kv_pos[:, None, :]  # (B, T, S): how far back each key is from each query
    mask = dist >= 0 if same_image is None else (dist >= 0) | same_image
    return (mask if window is None else mask & (dist < window))[:, None]  # one for all heads


def image_index(is_image: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True at image soft tokens -> (B, T): which image each token belongs to (0, 1, ...: each run
    of soft tokens is one image), -1 for text tokens."""
    starts = is_image & ~F.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.cumsum(1) - 1, -1)


def same_image_mask(q_images: torch.Tensor, kv_images: torch.Tensor) -> torch.Tensor:
    """(B, T, S) bool, True where query and key are tokens of the same image (image_index of each): those
    attend both ways."""
    q, kv = q_images[:, :, None], kv_images[:, None, :]
    return (q == kv) & (q >= 0)


def same_image_masks(
    images: torch.Tensor, pos: torch.Tensor | None, kv_global: torch.Tensor, kv_local: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, S) masks of the query/key pairs in one image (images: image_index of this call's tokens), for the
    global and the local keys (kv_global, kv_local: their positions, cached_key_positions). Only this call's own
    tokens can share an image with a query: the cached keys count as text."""
    if pos is None:
        return same_image_mask(images, images), same_image_mask(images, images)
    kv_global_images = torch.full_like(kv_global, -1).scatter(1, pos, images)
    kv_local_images = F.pad(images, (kv_local.shape[1] - images.shape[1], 0), value=-1)  # the ring, the chunk
    return same_image_mask(images, kv_global_images), same_image_mask(images, kv_local_images)


ALL = slice(None)  # every row of the KV cache
Mask = torch.Tensor | list[torch.Tensor]  # (B, 1, T, S), or one (1, 1, T, S_r) per row (row_masks)


class CacheWrite(NamedTuple):
    """Where a call's keys and values go: positions pos (B, T) in the KV cache's rows `rows` (B of them)."""

    pos: torch.Tensor
    rows: slice = ALL


class KVCache(nn.Module):
    """Pre-allocated keys and values for one layer (fixed shapes, so the decode step compiles).

    Each batch row holds one sequence, at its own positions. A global layer keeps every position:
    slot = position. A local layer only ever looks back `sliding_window` tokens, so it keeps a ring buffer
    of that many slots (slot = position % length) and its memory stays flat however long the context grows.
    """

    def __init__(self, batch_size: int, length: int, num_kv_heads: int, head_dim: int, dtype, device, ring: bool):
        super().__init__()
        self.ring = ring
        shape = (batch_size, num_kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, write: CacheWrite, k: torch.Tensor, v: torch.Tensor, mask: Mask
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) of positions write.pos (B, T) in the cache rows write.rows; return the n
        keys and values the mask covers (n: its length, see filled_slots): the cache's first n slots (global,
        and a local one for a single token: the slot it takes holds the key a whole window back, which it no
        longer sees), or the ring's first n - T slots as they were followed by the T new entries (local; a chunk
        longer than one token would otherwise overwrite keys its own first queries still need)."""
        (pos, rows), n = write, mask_length(mask)
        k_cache, v_cache = self.k[rows], self.v[rows]  # views: (B, n_kv, length, hd)
        length, T = k_cache.shape[2], k.shape[2]
        if not self.ring or T == 1:
            store(k_cache, v_cache, pos % length if self.ring else pos, k, v)
            return k_cache[:, :, :n], v_cache[:, :, :n]
        k_all = torch.cat([k_cache[:, :, : n - T], k], dim=2)  # (B, n_kv, n, hd)
        v_all = torch.cat([v_cache[:, :, : n - T], v], dim=2)
        keep = min(T, length)  # only the newest `length` entries survive in the ring
        store(k_cache, v_cache, pos[:, -keep:] % length, k[:, :, -keep:], v[:, :, -keep:])
        return k_all, v_all


def store(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k, v (B, n_kv, T, hd) into the caches' slots (B, T): each row at its own slots. One index_copy_ into
    the cache seen as a list of (row, head, slot) vectors, because torch.compile updates that in place (a
    scatter_ along the slots made it copy every cache on every step)."""
    B, num_kv_heads, length, head_dim = k_cache.shape
    first_slot = torch.arange(B * num_kv_heads, device=slots.device).view(B, num_kv_heads, 1) * length
    index = (first_slot + slots[:, None, :]).flatten()  # (B * n_kv * T,)
    k_cache.view(-1, head_dim).index_copy_(0, index, k.reshape(-1, head_dim))
    v_cache.view(-1, head_dim).index_copy_(0, index, v.reshape(-1, head_dim))


def filled_slots(upto: torch.Tensor, length: int) -> int:
    """How many of a cache's `length` slots attention reads. Slots fill in position order from 0 until a ring
    wraps, so eager reads only those holding positions < upto (the largest of the batch's rows; a chat's 8k
    cache costs what its words do); compiled, all of them (one fixed shape, compiled once). Masks hide stale
    and empty slots either way."""
    return length if torch.compiler.is_compiling() else min(int(upto), length)


# Which positions each cache slot holds. A global cache's slot is its position; a ring's slots are tracked in a
# (B, ring) tensor of positions, "ring_pos", which the model keeps beside its caches (one for all local layers).


def ring_positions(batch_size: int, ring: int, window: int, device) -> torch.Tensor:
    """The empty rings' positions: never-written slots lie a whole window back, outside every window."""
    return torch.full((batch_size, ring), -window, device=device)


def record_ring(ring_pos: torch.Tensor, pos: torch.Tensor) -> None:
    """After a call at positions pos (B, T): what the ring slots hold now."""
    keep = pos[:, -ring_pos.shape[1] :]
    ring_pos.scatter_(1, keep % ring_pos.shape[1], keep)


def cached_key_positions(
    ring_pos: torch.Tensor, cache_len: int, window: int, pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions (B, S) of the keys that queries at pos (B, T) attend over, in the order KVCache.update
    returns them: the global caches' filled slots (slot = position), and the local ones' ring (ring_pos, (B,
    ring)) then this chunk. A slot that a row has not filled yet (another row reaches further) holds no key the
    mask lets it see."""
    if ring_pos.shape[0] != pos.shape[0]:
        raise ValueError(f"{pos.shape[0]} rows of input for {ring_pos.shape[0]} rows of the KV cache")
    B, ring_len = ring_pos.shape
    kv_global = torch.arange(filled_slots(pos[:, -1].max() + 1, cache_len), device=pos.device).expand(B, -1)
    # Ring entries at or past a row's first position are stale, left by an earlier sequence in a reused row:
    # move them out of the window. (So a chunk either continues where its row's last one ended or starts a
    # new sequence at 0: a ring cannot rewind, it has already overwritten what the rewound queries would need.)
    ring = ring_pos.masked_fill(ring_pos >= pos[:, :1], -window)
    if pos.shape[1] == 1:  # one token: it is written into its ring slot before attending (KVCache.update)
        return kv_global, ring.scatter(1, pos % ring_len, pos)[:, : filled_slots(pos.max() + 1, ring_len)]
    return kv_global, torch.cat([ring[:, : filled_slots(pos[:, 0].max(), ring_len)], pos], dim=1)


def row_masks(pos: torch.Tensor, mask: torch.Tensor) -> Mask:
    """For one token in each of B rows at different positions pos (B, 1): the mask (B, 1, 1, S) cut into each
    row's own (1, 1, 1, S_r), the S_r slots the row has filled (as filled_slots counts them for the row
    alone). Attention over more keys, the masked ones included, rounds otherwise (its matmuls block by
    length), and bf16 activations make that visible: each row attending over exactly its own keys decodes
    bit for bit as it does alone (batch invariance). Rows all at one length keep the one mask."""
    lengths = [min(p + 1, mask.shape[-1]) for p in pos[:, 0].tolist()]
    if len(set(lengths)) == 1:
        return mask
    return [mask[r : r + 1, ..., :n] for r, n in enumerate(lengths)]


# The two calls a decoder makes: allocate_caches once, attention_masks on every forward (which also keeps the
# rings' positions: the decoders never touch them).


def allocate_caches(model: nn.Module, batch_size: int, max_seq_len: int, owners: Iterable[nn.Module]) -> None:
    """Allocate a decoder's static KV cache: a KVCache in each layer of `owners` (those that own keys and values:
    all of Gemma 3's, Gemma 4's but the KV-shared ones), sized by its attention's num_kv_heads and head_dim,
    max_seq_len slots on a global layer, a ring of the window's on a local one; beside them, the model's
    ring_pos, cache_len and cache_batch. model: the decoder (its config's max_seq_len and sliding_window; its
    final norm's dtype and device)."""
    c = model.config
    if max_seq_len > c.max_seq_len:
        raise ValueError(f"a cache of {max_seq_len} tokens exceeds the model's context of {c.max_seq_len}")
    device = model.norm.weight.device
    dtype = attention_dtype(model.norm.weight.dtype, device)
    ring = min(c.sliding_window, max_seq_len)
    for layer in owners:
        attn, length = layer.attn, max_seq_len if layer.is_global else ring
        attn.kv_cache = KVCache(
            batch_size, length, attn.num_kv_heads, attn.head_dim, dtype, device, ring=not layer.is_global
        )
    model.register_buffer("ring_pos", ring_positions(batch_size, ring, c.sliding_window, device), persistent=False)
    model.cache_len, model.cache_batch = max_seq_len, batch_size


def attention_masks(
    model: nn.Module,
    x: torch.Tensor,
    pos: torch.Tensor | None,
    rows: slice,
    images: torch.Tensor | None,
    global_images: bool = True,
) -> tuple[torch.Tensor, Mask, Mask, CacheWrite | None]:
    """One forward's attention set-up, for x (B, T, D) at positions pos: (B, T), (T,) for every row alike, or None
    (0..T-1, no cache), in the cache rows `rows` -> the queries' positions (B, T) (RoPE's), the global and the
    local layers' masks over the keys each attends to (cached_key_positions), and where the keys and values go
    (None without pos). images (B, T), from image_index: the tokens of one image see each other both ways on
    the local layers, and on the global ones too if global_images. model: the decoder (allocate_caches').
    With pos, model.ring_pos records what the rings hold once the layers have written this call's keys: it is
    read only here, before that."""
    B, T, _ = x.shape
    window = model.config.sliding_window
    if pos is not None and pos.dim() == 1:  # (T,): the same positions in every row
        pos = pos.expand(B, T)
    q_pos = torch.arange(T, device=x.device).expand(B, T) if pos is None else pos
    kv_global = kv_local = q_pos
    if pos is not None:
        if model.cache_len == 0:
            raise RuntimeError("call setup_cache(batch_size, max_seq_len) before decoding with positions")
        kv_global, kv_local = cached_key_positions(model.ring_pos[rows], model.cache_len, window, pos)
    same_global = same_local = None
    if images is not None:
        same_global, same_local = same_image_masks(images, pos, kv_global, kv_local)
    global_mask = attention_mask(q_pos, kv_global, same_image=same_global if global_images else None)
    local_mask = attention_mask(q_pos, kv_local, window, same_local)
    if pos is not None and T == 1 and B > 1 and not torch.compiler.is_compiling():
        global_mask, local_mask = row_masks(pos, global_mask), row_masks(pos, local_mask)
    if pos is not None:
        record_ring(model.ring_pos[rows], pos)
    return q_pos, global_mask, local_mask, None if pos is None else CacheWrite(pos, rows)


def mask_length(mask: Mask) -> int:
    """How many keys attention reads: the longest of the masks."""
    return max(m.shape[-1] for m in mask) if isinstance(mask, list) else mask.shape[-1]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, scale: float) -> torch.Tensor:
    """q (B, nh, T, hd) over the first mask.shape[-1] of the keys and values k, v (B, n_kv, S, hd) -> (B, nh, T, hd).
    A mask per row (row_masks): each row attends over exactly its own keys, as it would alone."""
    if isinstance(mask, list):
        return torch.cat([attend(q[r : r + 1], k[r : r + 1], v[r : r + 1], m, scale) for r, m in enumerate(mask)])
    B, num_heads, T, head_dim = q.shape
    if T == 1 and k.shape[1] > 1:  # decode: each kv head's query heads as its queries (B, n_kv, g, hd),
        q = q.view(B, k.shape[1], -1, head_dim)  # so no copy of the cache repeated per query head
    k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return y.reshape(B, num_heads, T, head_dim)
