"""The Gemma 3 decoder, top to bottom.

Read in order: RMSNorm, rotary embeddings, the attention masks (causal, sliding window, images seen both
ways), the KV cache, attention, the GeGLU MLP, the sandwich-norm block, the projector that maps the vision
tower's output into the embedding space, and the model. Image prompts (4B/12B/27B) add vision.py's tower,
whose projected output takes the place of the image soft tokens' embeddings. The configs are config.py's;
loading a checkpoint into this model is loader.py's.
Weights are plain nn.Linear / nn.Embedding here; quant.py swaps in int4 versions from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant, vision
from .config import TEXT_VOCAB_SIZE, Gemma3Config, VisionConfig
from .quant import attention_dtype


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, scaled by (1 + weight), cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).type_as(x)


class Gemma4RMSNorm(nn.Module):
    """Gemma 4's RMSNorm (its decoder's and its towers'): computed in float32, scaled by weight (no 1 +), or not
    scaled at all."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return (x32 if self.weight is None else x32 * self.weight.float()).type_as(x)


Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (B, 1, T, head_dim) each


def rope_cos_sin(
    pos: torch.Tensor, head_dim: int, theta: float, scale: float, dtype: torch.dtype, rotated: float = 1.0
) -> Rope:
    """cos, sin of shape (B, 1, T, head_dim) for positions pos (B, T), computed in float32 like transformers.
    rotated < 1 ("proportional" RoPE, Gemma 4's full layers): only the first rotated * head_dim / 2 frequencies
    turn, the rest are 0 (cos 1, sin 0), so those dimensions pass through unrotated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float) / head_dim))
    inv_freq[int(rotated * head_dim // 2) :] = 0.0
    freqs = pos.float()[..., None] * (inv_freq / scale)  # (B, T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # one for all heads
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # rotate-half convention
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


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
        self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, rows: slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) of positions pos (B, T) in the cache rows `rows` (B of them); return the n
        keys and values to attend over (the mask's length, see filled_slots): the cache's first n slots (global,
        and a local one for a single token: the slot it takes holds the key a whole window back, which it no
        longer sees), or the ring's first n - T slots as they were followed by the T new entries (local; a chunk
        longer than one token would otherwise overwrite keys its own first queries still need)."""
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


class Attention(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.query_pre_attn_scalar**-0.5
        # q, k and v read the same input: their weights stacked by rows (see fuse_projections) make one matmul
        self.qkv_sizes = config.qkv_sizes
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_sizes), bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)  # QK-norm, per head
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: Mask, pos: torch.Tensor | None = None, rows: slice = ALL
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = self.q_norm(q.view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dtype = attention_dtype(x.dtype, x.device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if pos is not None:  # (B, n_kv, S, hd): the keys the masks cover
            k, v = self.kv_cache.update(pos, k, v, mask_length(mask), rows)
        y = attend(q, k, v, mask, self.scale).type_as(x)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


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


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)  # stacked
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    """Sandwich norms: each sub-layer's output is normalised again before the residual add."""

    def __init__(self, config: Gemma3Config, is_global: bool):
        super().__init__()
        self.is_global = is_global
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_ffw_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.post_ffw_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: Mask, pos: torch.Tensor | None = None, rows: slice = ALL
    ) -> torch.Tensor:
        h = x + self.post_attn_norm(self.attn(self.input_norm(x), rope, mask, pos, rows))
        return h + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(h)))


class Projector(nn.Module):
    """The vision tower's patch grid (N, 64*64, C) -> average-pooled 16x16 grid, RMSNorm, projected into the
    embedding space: (N, 256, D), the image soft tokens' embeddings."""

    def __init__(self, config: VisionConfig, text_hidden_size: int):
        super().__init__()
        self.patches_per_side = config.patches_per_side
        self.pool = config.patches_per_side // math.isqrt(config.tokens_per_image)
        self.mm_soft_emb_norm = RMSNorm(config.hidden_size, config.layer_norm_eps)
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(config.hidden_size, text_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, _, C = x.shape
        grid = x.transpose(1, 2).reshape(N, C, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)  # (N, tokens_per_image, C)
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).type_as(x)


class TiedEmbedding(nn.Embedding):
    """The token embedding, which is also the output head (tied weights; untied checkpoints have an OutputHead
    too, and only look up here). quant.QuantLinear has the same lookup/unembed pair, so an int4 embedding drops in."""

    def reset_parameters(self) -> None:
        pass  # no random init: the weights always come from a checkpoint (and normal_ is slow on the meta device)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self(ids)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class OutputHead(nn.Linear):
    """An output head of its own, for checkpoints that untie it from the embedding (tie_word_embeddings false);
    quantized like any linear layer."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def reset_parameters(self) -> None:
        pass  # as TiedEmbedding's

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


class Gemma3(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.embed = TiedEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, g) for g in config.global_layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else OutputHead(config.hidden_size, config.vocab_size)
        self.vision = self.projector = None
        if config.vision_config is not None:
            self.vision = vision.VisionTower(config.vision_config)
            self.projector = Projector(config.vision_config, config.hidden_size)
        self.cache_len = self.cache_batch = 0

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Allocate the static KV cache; afterwards forward(ids, pos) decodes incrementally."""
        c = self.config
        if max_seq_len > c.max_seq_len:
            raise ValueError(f"a cache of {max_seq_len} tokens exceeds the model's context of {c.max_seq_len}")
        device = self.norm.weight.device
        dtype = attention_dtype(self.norm.weight.dtype, device)
        ring = min(c.sliding_window, max_seq_len)
        for layer in self.layers:
            length = max_seq_len if layer.is_global else ring
            layer.attn.kv_cache = KVCache(
                batch_size, length, c.num_kv_heads, c.head_dim, dtype, device, ring=not layer.is_global
            )
        self.register_buffer("ring_pos", ring_positions(batch_size, ring, c.sliding_window, device), persistent=False)
        self.cache_len, self.cache_batch = max_seq_len, batch_size

    def embed_tokens(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D), scaled by sqrt(D). With pixel_values (N, 3, S, S), the image soft tokens
        take the N images' features instead (vision.py; not scaled), image after image in reading order."""
        if pixel_values is None:
            x = self.embed.lookup(input_ids)
            return x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)  # scale rounded to x's dtype
        if self.vision is None:
            raise ValueError("this model has no vision tower: it takes text only (images need Gemma 3 4B, 12B or 27B)")
        is_image = input_ids == self.config.vision_config.image_token_id
        features = self.projector(self.vision(pixel_values))  # (N, tokens_per_image, D)
        if int(is_image.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"the prompt has {int(is_image.sum())} image soft tokens, but {features.shape[0]} image(s) "
                f"need {features.shape[1]} each"
            )
        x = self.embed_tokens(input_ids.masked_fill(is_image, 0))
        return x.masked_scatter(is_image[..., None], features.to(x.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        pos: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        rows: slice = ALL,
    ) -> torch.Tensor:
        """input_ids (B, T) -> float logits (B, T, vocab_size).

        pos=None: a plain causal forward at positions 0..T-1, no cache.
        pos (B, T), or (T,) for every row alike: each row's positions, continuing the sequence its cache row
        holds (or 0.. to start a new one); their keys/values are written to the cache and attention reads it
        (see hidden_states). rows: which of the cache's rows (sequences) the B inputs are, all by default. Rows of
        a batch may be at different positions (batched decoding: each row a request of its own).
        pixel_values (N, 3, S, S): the images whose soft tokens input_ids holds (vision.preprocess makes them).
        """
        x = self.embed_tokens(input_ids, pixel_values)
        images = None if pixel_values is None else image_index(input_ids == self.config.vision_config.image_token_id)
        return self.logits(self.hidden_states(x, pos, images, rows))

    def hidden_states(
        self, x: torch.Tensor, pos: torch.Tensor | None = None, images: torch.Tensor | None = None, rows: slice = ALL
    ) -> torch.Tensor:
        """Input embeddings (B, T, D) -> final normed hidden states (B, T, D).

        images (B, T), from image_index(): the tokens of one image attend to each other both ways (causal
        elsewhere). An image must lie whole within one call (generation.prefill sees to that).
        """
        c = self.config
        B, T, _ = x.shape
        if pos is not None and pos.dim() == 1:  # (T,): the same positions in every row
            pos = pos.expand(B, T)
        q_pos = torch.arange(T, device=x.device).expand(B, T) if pos is None else pos
        kv_global, kv_local = (q_pos, q_pos) if pos is None else self.cached_key_positions(pos, rows)
        same_global = same_local = None
        if images is not None:
            same_global, same_local = same_image_masks(images, pos, kv_global, kv_local)
        global_mask = attention_mask(q_pos, kv_global, same_image=same_global)
        local_mask = attention_mask(q_pos, kv_local, c.sliding_window, same_local)
        if pos is not None and T == 1 and B > 1 and not torch.compiler.is_compiling():
            global_mask, local_mask = row_masks(pos, global_mask), row_masks(pos, local_mask)
        global_rope = rope_cos_sin(q_pos, c.head_dim, c.rope_theta_global, c.rope_scale_global, x.dtype)
        local_rope = rope_cos_sin(q_pos, c.head_dim, c.rope_theta_local, 1.0, x.dtype)
        for layer in self.layers:
            if layer.is_global:
                x = layer(x, global_rope, global_mask, pos, rows)
            else:
                x = layer(x, local_rope, local_mask, pos, rows)
        if pos is not None:
            record_ring(self.ring_pos[rows], pos)
        return self.norm(x)

    def cached_key_positions(self, pos: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache_len == 0:
            raise RuntimeError("call setup_cache(batch_size, max_seq_len) before decoding with positions")
        return cached_key_positions(self.ring_pos[rows], self.cache_len, self.config.sliding_window, pos)

    @property
    def head(self) -> nn.Module:
        """The output head: the embedding itself (tied), or lm_head."""
        return self.embed if self.lm_head is None else self.lm_head

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head.unembed(h).float()
        if self.config.vocab_size > TEXT_VOCAB_SIZE:  # padding rows are never valid outputs
            logits[..., TEXT_VOCAB_SIZE:] = float("-inf")
        return logits


# Checkpoints store q, k, v (and gate, up) as separate weights; the model holds each group stacked by rows, so
# that one matmul reads them all. Every format stacks row by row: int4/int8 data and their per-row scales alike.
FUSED = {
    "attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
KINDS = (*quant.FORMATS, "weight")  # int4_data, int8_data, weight: from the narrowest to the widest


def fuse_projections(
    tensors: dict[str, torch.Tensor],
    num_layers: int,
    groups: dict[str, tuple[str, ...]] = FUSED,
    consume: bool = False,
) -> dict[str, torch.Tensor]:
    """A state dict in the checkpoints' names -> the model's: each layer's q/k/v and gate/up weights stacked into
    qkv_proj and gate_up_proj (already stacked ones pass; `groups`: which, gemma4.py's only gate/up). A group
    mixing kinds is stacked in its widest: a GGUF's int8 v_proj beside int4 q and k makes all three int8 (per-row,
    finer than int4's steps). consume: stacks within `tensors` itself, so each layer's parts are freed as soon as
    they are stacked (the caller keeps no other reference to them) and the peak is one layer above the weights."""
    out = tensors if consume else dict(tensors)
    for i, fused in ((i, f) for i in range(num_layers) for f in groups):
        parts = [f"layers.{i}.{p}" for p in groups[fused]]
        kinds = [next((k for k in KINDS if f"{p}.{k}" in tensors), None) for p in parts]
        if all(k is None for k in kinds):
            continue  # already stacked, or not there at all (check_state_dict names what is missing)
        if None in kinds:
            missing = [f"{p}.weight" for p, k in zip(parts, kinds, strict=True) if k is None]
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing)}")
        kind = max(kinds, key=KINDS.index)
        stacked = [as_kind(out, p, k, kind) for p, k in zip(parts, kinds, strict=True)]
        if any("zeros" in pieces for pieces in stacked):  # int4 with zero points beside symmetric int4: zeros of 0
            for pieces in stacked:
                pieces.setdefault("zeros", torch.zeros_like(pieces["scales"]))
        for name in stacked[0]:
            out[f"layers.{i}.{fused}.{name}"] = torch.cat([pieces[name] for pieces in stacked])
    return out


def as_kind(tensors: dict[str, torch.Tensor], module: str, kind: str, target: str) -> dict[str, torch.Tensor]:
    """Pop module's weight (kind: "int4_data", "int8_data" or "weight") from tensors, converted to target's kind:
    {"weight": w} or {target: data, "scales": scales} (and "zeros": an int4 weight's zero points, if it has them)."""
    parts = [part for part in (kind, "scales", "zeros") if f"{module}.{part}" in tensors]
    if kind == target:
        return {part: tensors.pop(f"{module}.{part}") for part in parts}
    w = tensors[f"{module}.weight"] if kind == "weight" else quant.dequantize(tensors, module)  # float32
    for part in parts:
        del tensors[f"{module}.{part}"]
    if target == "weight":
        return {"weight": w}
    return dict(zip((target, "scales"), quant.FORMATS[target].quantize(w), strict=True))


def split_projections(tensors: dict[str, torch.Tensor], config: Gemma3Config) -> dict[str, torch.Tensor]:
    """The inverse of fuse_projections: stacked qkv_proj / gate_up_proj tensors back to the checkpoints' names
    (gate and up are halves; q, k and v config.qkv_sizes)."""
    out = {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        layer, _, fused = module.partition(".")[2].partition(".")
        if not (name.startswith("layers.") and fused in FUSED):
            out[name] = t
            continue
        pieces = t.split(config.qkv_sizes) if fused == "attn.qkv_proj" else t.chunk(2)
        for part, piece in zip(FUSED[fused], pieces, strict=True):
            out[f"layers.{layer}.{part}.{kind}"] = piece
    return out
