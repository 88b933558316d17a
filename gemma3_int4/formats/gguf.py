"""GGUF (llama.cpp) checkpoints of Gemma 3 and Gemma 4, read and written with llama.cpp's own `gguf` package.

llama.cpp's conventions differ from transformers' in three places, all undone here:
- tensor names (`blk.{i}.attn_q.weight`, ...), mapped onto ours in NAMES (and Gemma 4's in GEMMA4_NAMES);
- Gemma 3's norm weights are stored with the +1 of its (1 + w) RMSNorm already added (Gemma 4's scale by w);
- the tokenizer lives in the metadata (tokens, scores, token types), rebuilt here as a SentencePiece model.
Q4_0 is symmetric int4 with groups of 32, like ours, and imports exactly; Q4_1 and Q4_K (a scale and a minimum per
32) import exactly as int4 with zero points, and go back out as Q4_K (when the blocks are Q4_K's) or Q4_1 (the
blocks: gguf_blocks.py); types with more than 4 bits are kept at 8 bits by weights="auto" (int8, one scale per
row: close to what the file holds, see bench/README.md).
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from .. import files, quant
from ..config import AUDIO_MODULES, VISION_MODULES, Gemma3Config, Gemma4Config
from ..hf_tokenizer import merge_scores, parse_sentencepiece_proto, sentencepiece_proto
from .gguf_blocks import q4_0_blocks, q4_0_ints, q4_1_blocks, q4_k_blocks, q4_zero_ints, q8_0_blocks

ARCH, GEMMA4_ARCH = "gemma3", "gemma4"
NAMES = {  # GGUF -> ours; "blk.{i}." becomes "layers.{i}."
    "token_embd": "embed",
    "output_norm": "norm",
    "attn_norm": "input_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "post_attention_norm": "post_attn_norm",
    "ffn_norm": "pre_ffw_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_ffw_norm",
    "output": "lm_head",  # an untied output head (Gemma's own checkpoints tie it to token_embd)
}
GEMMA4_NAMES = {  # GGUF -> ours, beside NAMES: Gemma 4's additions (llama.cpp's convert_hf_to_gguf.py)
    "per_layer_token_embd": "embed_per_layer",
    "per_layer_model_proj": "per_layer_model_projection",
    "per_layer_proj_norm": "per_layer_projection_norm",
    "inp_gate": "per_layer_input_gate",
    "proj": "per_layer_projection",
    "post_norm": "post_per_layer_input_norm",
    "ffn_gate_inp": "router.proj",
    "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
    "post_ffw_norm_1": "post_feedforward_layernorm_1",
    "post_ffw_norm_2": "post_feedforward_layernorm_2",
    "ffn_gate_up_exps": "experts.gate_up_proj",  # (experts, 2I, D), stacked as in transformers
    "ffn_down_exps": "experts.down_proj",
}
GEMMA4_WHOLE_NAMES = {  # GGUF tensors whose whole name maps (not ".weight" of a module)
    "layer_output_scale.weight": "layer_scalar",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",  # llama.cpp scales each expert's output by it
}
ROPE_FREQS = "rope_freqs.weight"  # Gemma 4: 1 for the full layers' rotated frequencies, 1e30 (never turns) after
Q = gguf.GGMLQuantizationType
ABOVE_4_BITS = {Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q8_1, Q.Q8_K}  # types with more than 4 bits a weight


@functools.lru_cache(maxsize=1)  # parsing the 262k-token vocabulary takes gguf's reader seconds: do it once
def open_gguf(path: Path) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on damaged files
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = field(reader, "general.architecture")
    if arch not in (ARCH, GEMMA4_ARCH):
        raise ValueError(f"{path}: GGUF architecture is {arch!r}, not {ARCH!r} (Gemma 3) or {GEMMA4_ARCH!r}")
    return reader


def field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_config(reader: gguf.GGUFReader, path: Path) -> dict:
    """The transformers `gemma3_text` (or `gemma4_text`) config this GGUF describes (llama.cpp keeps what it does
    not store fixed)."""
    if field(reader, "general.architecture") == GEMMA4_ARCH:
        return gemma4_hf_config(reader, path)

    get = lambda key, default=None: required(reader, path, f"{ARCH}.{key}", default)
    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    scaling = field(reader, f"{ARCH}.rope.scaling.type", "none")
    return {
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "sliding_window": get("attention.sliding_window"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": get("context_length"),
        "rope_theta": get("rope.freq_base", 1_000_000.0),
        "rope_local_base_freq": get("rope.freq_base_swa", 10_000.0),
        "rope_scaling": {"rope_type": "linear", "factor": get("rope.scaling.factor")} if scaling == "linear" else None,
        "query_pre_attn_scalar": query_pre_attn_scalar(reader, hidden, heads, head_dim, get("block_count")),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "vocab_size": vocab_size(reader, path),
    }


def required(reader: gguf.GGUFReader, path: Path, key: str, default=None):
    """A metadata value, or its default; an error names the key if it has neither."""
    value = field(reader, key, default)
    if value is None:
        raise ValueError(f"{path}: GGUF metadata has no {key}")
    return value


def vocab_size(reader: gguf.GGUFReader, path: Path) -> int:
    """The tokenizer's size, else the embedding's rows."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ValueError(f"{path}: the GGUF has neither a tokenizer nor a token_embd.weight tensor")
    return int(embedding.shape[1])  # GGUF lists dims fastest first


def gemma4_hf_config(reader: gguf.GGUFReader, path: Path) -> dict:
    """The `gemma4_text` config of a gemma4 GGUF. Per-layer values (llama.cpp writes an array where the layers
    differ): the MLP width (double-wide in the KV-shared layers) and the kv heads (the full layers' own with
    k_eq_v, whose full layers have no attn_v)."""

    get = lambda key, default=None: required(reader, path, f"{GEMMA4_ARCH}.{key}", default)
    n_layers = get("block_count")
    sliding = get("attention.sliding_window_pattern")
    if not isinstance(sliding, list) or len(sliding) != n_layers:
        raise ValueError(f"{path}: {GEMMA4_ARCH}.attention.sliding_window_pattern must list {n_layers} booleans")
    shared = get("attention.shared_kv_layers", 0)
    per_layer = lambda value: value if isinstance(value, list) else [value] * n_layers
    ff, kv_heads = per_layer(get("feed_forward_length")), per_layer(get("attention.head_count_kv"))
    full = [i for i in range(n_layers) if not sliding[i]]
    names = {t.name for t in reader.tensors}
    k_eq_v = bool(full) and f"blk.{full[0]}.attn_k.weight" in names and f"blk.{full[0]}.attn_v.weight" not in names
    global_head_dim = get("attention.key_length")
    rope_freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    rotated = int((np.array(rope_freqs.data) == 1.0).sum()) if rope_freqs is not None else global_head_dim // 8
    experts = field(reader, f"{GEMMA4_ARCH}.expert_count") or 0
    return {
        "model_type": "gemma4_text",
        "hidden_size": get("embedding_length"),
        "num_hidden_layers": n_layers,
        "intermediate_size": ff[0],
        "use_double_wide_mlp": ff[-1] == 2 * ff[0] and shared > 0,
        "num_attention_heads": get("attention.head_count"),
        "num_key_value_heads": kv_heads[sliding.index(True)] if True in sliding else kv_heads[0],
        "num_global_key_value_heads": kv_heads[full[0]] if k_eq_v else None,
        "attention_k_eq_v": k_eq_v,
        "head_dim": get("attention.key_length_swa"),
        "global_head_dim": global_head_dim,
        "sliding_window": get("attention.sliding_window"),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "num_kv_shared_layers": shared,
        "hidden_size_per_layer_input": get("embedding_length_per_layer_input", 0),
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon', 1e-6):.6g}"),  # as written, not float32's
        "max_position_embeddings": get("context_length"),
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": get("rope.freq_base_swa", 10_000.0)},
            "full_attention": {
                "rope_type": "proportional",
                "rope_theta": get("rope.freq_base", 1_000_000.0),
                "partial_rotary_factor": 2 * rotated / global_head_dim,
            },
        },  # fmt: skip
        "final_logit_softcapping": get("final_logit_softcapping", 30.0),
        "enable_moe_block": experts > 0,
        "num_experts": experts or None,
        "top_k_experts": field(reader, f"{GEMMA4_ARCH}.expert_used_count"),
        "moe_intermediate_size": field(reader, f"{GEMMA4_ARCH}.expert_feed_forward_length"),
        "tie_word_embeddings": "output.weight" not in names,
        "vocab_size": vocab_size(reader, path),
        "vocab_size_per_layer_input": next(
            (int(t.shape[1]) for t in reader.tensors if t.name == "per_layer_token_embd.weight"), 262144
        ),
    }


def query_pre_attn_scalar(reader: gguf.GGUFReader, hidden: int, heads: int, head_dim: int, layers: int) -> float:
    """From attention.scale if the file has it; else llama.cpp's rule: 1/sqrt(head_dim), but for the
    27B (62 layers) 1/sqrt(hidden / heads) = 1/sqrt(168)."""
    scale = field(reader, f"{ARCH}.attention.scale")
    if scale:
        return round(scale**-2, 3)
    return hidden // heads if layers == 62 else head_dim


def our_name(name: str, arch: str = ARCH) -> str:
    """blk.{i}.{tensor}.{weight} or {tensor}.{weight}, GGUF's names -> ours; others are an error."""
    names = NAMES | GEMMA4_NAMES if arch == GEMMA4_ARCH else NAMES
    parts = name.split(".")
    blk = len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit()
    if blk and arch == GEMMA4_ARCH and ".".join(parts[2:]) in GEMMA4_WHOLE_NAMES:
        return f"layers.{parts[1]}.{GEMMA4_WHOLE_NAMES['.'.join(parts[2:])]}"
    if blk and parts[2] in names and parts[3] == "weight":
        return f"layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in names and parts[1] == "weight":
        return f"{names[parts[0]]}.{parts[1]}"
    raise ValueError(f"GGUF tensor {name!r} is not one of {'Gemma 4' if arch == GEMMA4_ARCH else 'Gemma 3'}'s")


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor], set[str]]:
    """The config and tensors (our names) of a Gemma 3 GGUF: Q4_0 as our int4 and Q4_1 / Q4_K as int4 with zero
    points (exact), every other type as float32 from gguf's own dequantizers (norms shifted back to
    transformers' w). The third item names the weights the file stores above 4 bits (Q5_0, Q8_0, Q6_K...),
    which weights="auto" keeps at 8 bits."""
    reader = open_gguf(path)
    arch = field(reader, "general.architecture")
    config, tensors, above_4_bits = hf_config(reader, path), {}, set()
    stored = [t for t in reader.tensors if t.name != ROPE_FREQS]  # Gemma 4's: the config's partial rotary factor
    try:
        names = [our_name(t.name, arch) for t in stored]  # an unknown name fails now, before the slow reading
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    bar = tqdm(stored, desc="reading GGUF", unit="tensor", disable=None, leave=False)
    for name, t in zip(names, bar, strict=True):
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest first
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)).view(shape)
        if len(shape) == 3:  # Gemma 4's experts, (E, N, K): one weight per expert, as the model holds them
            layer, _, part = name.removesuffix(".weight").rpartition(".")
            raw = np.array(t.data).reshape(shape[0], shape[1], -1)
            for e in range(shape[0]):
                read_tensor(tensors, above_4_bits, f"{layer}.{e}.{part}.weight", raw[e], w[e], t.tensor_type, arch)
        else:
            read_tensor(tensors, above_4_bits, name, t.data, w, t.tensor_type, arch)
    return config, tensors, above_4_bits


def read_tensor(tensors: dict, above_4_bits: set, name: str, raw: np.ndarray, w: torch.Tensor, kind: int, arch: str):
    """One GGUF tensor (its raw blocks and gguf's float32 dequantization w) into tensors, our names and kinds."""
    module = name.removesuffix(".weight")
    if kind == Q.Q4_0:
        q, d = q4_0_ints(raw, w)
        tensors[f"{module}.int4_data"], tensors[f"{module}.scales"] = quant.pack_int4(q), d
    elif kind in (Q.Q4_1, Q.Q4_K):
        parts = q4_zero_ints(raw, w, kind)
        tensors |= {f"{module}.{part}": x for part, x in zip(("int4_data", "scales", "zeros"), parts, strict=True)}
    elif name.endswith("norm.weight") and arch == ARCH:
        tensors[name] = w - 1.0  # llama.cpp stores Gemma 3's norms as 1 + w
    else:
        tensors[name] = w
        if kind in ABOVE_4_BITS:
            above_4_bits.add(name)


def tokenizer_proto(path: Path) -> bytes:
    """Rebuild Gemma's SentencePiece model (a serialized ModelProto) from the GGUF tokenizer metadata."""
    reader = open_gguf(path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(f"{path}: the GGUF holds no tokenizer (convert.py takes --tokenizer)")
    model = field(reader, "tokenizer.ggml.model")
    if model not in ("llama", "gemma4"):
        raise ValueError(f"{path}: tokenizer model {model!r} is neither SentencePiece's nor Gemma 4's")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = field(reader, "tokenizer.ggml.token_type")
    # llama.cpp writes the whitespace-run pieces ("▁▁", ...) with real spaces; SentencePiece matches pieces
    # after turning spaces into U+2581, so no piece of its own contains a space.
    pieces = [bytes(tokens.parts[i]).replace(b" ", "\u2581".encode()) for i in tokens.data]
    if model == "gemma4":  # llama.cpp's converter keeps tokenizer.json's merges, and writes no real scores
        merges = reader.fields.get("tokenizer.ggml.merges")
        if merges is None:
            raise ValueError(f"{path}: a gemma4 tokenizer without tokenizer.ggml.merges")
        ranked = [bytes(merges.parts[i]).decode().split(" ", 1) for i in merges.data]
        scores = merge_scores([p.decode() for p in pieces], ranked)
    else:
        scores = field(reader, "tokenizer.ggml.scores")
    ids = {k: field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos", "padding")}
    return sentencepiece_proto(pieces, scores, types, ids)


def gguf_name(name: str) -> str:
    """Ours -> GGUF's (a quantized weight's data names its tensor; Gemma 4's too)."""
    inverse = {v: k for k, v in (NAMES | GEMMA4_NAMES).items()}
    whole = {v: k for k, v in GEMMA4_WHOLE_NAMES.items()}
    parts = name.split(".")
    if parts[0] == "layers" and ".".join(parts[2:]) in whole:
        return f"blk.{parts[1]}.{whole['.'.join(parts[2:])]}"
    parts = parts[:-1]  # the module
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{inverse['.'.join(parts[2:])]}.weight"
    return f"{inverse[parts[0]]}.weight"


def write(config: Gemma3Config | Gemma4Config, tensors: dict[str, torch.Tensor], tokenizer: bytes, path: Path,
         chat_template: str | None = None) -> None:  # fmt: skip
    """Write a Gemma 3 (or Gemma 4) GGUF that llama.cpp runs: int4 -> Q4_0 (exact when the bf16 scales fit fp16
    exactly, as QAT scales do); int4 with zero points -> Q4_K where each 256 weights are a Q4_K block (a Q4_K
    source's are: exact), else Q4_1 (scales and minimums rounded to fp16 where they do not fit); int8 -> Q8_0
    (row scales rounded to fp16); Gemma 3's norms F32 as 1 + w; an untied head as output.weight; and the full
    tokenizer with the chat template (which llama.cpp's chat applies). Written atomically (files.atomic_output)."""
    gemma4 = isinstance(config, Gemma4Config)
    if not gemma4 and config.global_layers != [(i + 1) % 6 == 0 for i in range(config.num_layers)]:
        raise ValueError("llama.cpp's gemma3 expects every 6th layer to be global; this model's pattern differs")
    with files.atomic_output(path) as tmp:
        write_gguf(config, stack_experts(tensors) if gemma4 else tensors, tokenizer, tmp, chat_template)


def stack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | list]:
    """Gemma 4's experts, one weight each ("layers.N.experts.<e>.gate_up_proj.*"), as GGUF holds them: one tensor
    per layer and part, here the list of the experts' tensors ("layers.N.experts.gate_up_proj.*")."""
    out = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if len(parts) == 6 and parts[2] == "experts" and parts[3].isdigit():
            out.setdefault(".".join(parts[:3] + parts[4:]), []).append((int(parts[3]), t))
        else:
            out[name] = t
    return {k: [t for _, t in sorted(v, key=lambda p: p[0])] if isinstance(v, list) else v for k, v in out.items()}


def gemma4_metadata(w: gguf.GGUFWriter, c: Gemma4Config) -> None:
    """What llama.cpp's gemma4 reads (as its convert_hf_to_gguf.py writes it): per-layer arrays where layers differ."""
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    ff = [c.layer_intermediate_size(i) for i in range(c.num_layers)]
    w.add_feed_forward_length(ff if len(set(ff)) > 1 else ff[0])
    w.add_head_count(c.num_heads)
    kv = [c.layer_kv_heads(i) for i in range(c.num_layers)]
    w.add_head_count_kv(kv if len(set(kv)) > 1 else kv[0])
    w.add_key_length(c.global_head_dim)
    w.add_value_length(c.global_head_dim)
    w.add_key_length_swa(c.head_dim)
    w.add_value_length_swa(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta_global)
    w.add_rope_freq_base_swa(c.rope_theta_local)
    w.add_rope_dimension_count(c.global_head_dim)  # proportional RoPE: the rest is rope_freqs' work
    w.add_rope_dimension_count_swa(c.head_dim)
    w.add_sliding_window(c.sliding_window)
    w.add_sliding_window_pattern([not g for g in c.global_layers])
    w.add_shared_kv_layers(c.num_kv_shared_layers)
    w.add_embedding_length_per_layer_input(c.hidden_size_per_layer_input)
    w.add_final_logit_softcapping(c.final_logit_softcapping)
    if c.num_experts:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.top_k_experts)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    rotated = int(c.partial_rotary_factor * c.global_head_dim // 2)
    freqs = np.array([1.0] * rotated + [1e30] * (c.global_head_dim // 2 - rotated), dtype=np.float32)
    w.add_tensor(ROPE_FREQS, freqs)


def write_gguf(config: Gemma3Config | Gemma4Config, tensors: dict, tokenizer: bytes, path: Path,
               chat_template: str | None = None) -> None:  # fmt: skip
    gemma4 = isinstance(config, Gemma4Config)
    w = gguf.GGUFWriter(path, GEMMA4_ARCH if gemma4 else ARCH)
    w.add_name("Gemma 4" if gemma4 else "Gemma 3")
    if gemma4:
        gemma4_metadata(w, config)
    else:
        gemma3_metadata(w, config)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, tokenizer)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    add_tensors(w, tensors, norm_shift=0.0 if gemma4 else 1.0)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=sys.stderr.isatty())  # a bar for people, none in logs
    finally:
        w.close()


def gemma3_metadata(w: gguf.GGUFWriter, config: Gemma3Config) -> None:
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta_global)
    w.add_rope_freq_base_swa(config.rope_theta_local)
    w.add_sliding_window(config.sliding_window)
    w.add_attention_scale(config.query_pre_attn_scalar**-0.5)
    if config.rope_scale_global != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scale_global)


def add_tokenizer(w: gguf.GGUFWriter, tokenizer: bytes) -> None:
    pieces = parse_sentencepiece_proto(tokenizer)
    # llama.cpp matches user-defined pieces on the raw text: its whitespace pieces hold real spaces
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([p.replace("\u2581".encode(), b" ") if t == 4 else p for p, _, t in pieces])
    w.add_token_scores([s for _, s, _ in pieces])
    w.add_token_types([t for _, _, t in pieces])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)


def add_tensors(w: gguf.GGUFWriter, tensors: dict, norm_shift: float) -> None:
    """Every tensor in its GGUF type (see write); a list (stack_experts) becomes one tensor, (experts, N, K)."""
    text_tensors = {name: t for name, t in tensors.items() if not name.startswith((*VISION_MODULES, *AUDIO_MODULES))}
    towers = [kind for kind, prefixes in (("vision", VISION_MODULES), ("audio", AUDIO_MODULES))
              if any(name.startswith(prefixes) for name in tensors)]  # fmt: skip
    if towers:
        warnings.warn(f"the {' and '.join(towers)} tower{'s are' if len(towers) > 1 else ' is'} not written: "
                      "llama.cpp keeps them in a separate mmproj GGUF", stacklevel=2)  # fmt: skip
    rounded = {}  # module -> the largest relative change of a Q4_1 d or m
    for name, t in text_tensors.items():
        module, _, kind = name.rpartition(".")
        if isinstance(t, list):  # Gemma 4's experts, each a weight of this layer's (experts, N, K)
            add_stacked(w, tensors, module, kind)
        elif kind == "int4_data" and f"{module}.zeros" in tensors:
            parts = t, tensors[f"{module}.scales"], tensors[f"{module}.zeros"]
            if (blocks := q4_k_blocks(*parts)) is not None:  # a Q4_K source's weights: back as they came, exactly
                w.add_tensor(gguf_name(name), blocks, raw_dtype=Q.Q4_K)
                continue
            blocks, rounded[module] = q4_1_blocks(*parts)
            w.add_tensor(gguf_name(name), blocks, raw_dtype=Q.Q4_1)
        elif kind == "int4_data":
            blocks, exact = q4_0_blocks(t, tensors[f"{module}.scales"])
            if exact:
                w.add_tensor(gguf_name(name), blocks, raw_dtype=Q.Q4_0)
                continue
            warnings.warn(f"{module}: scales are not exact in fp16; written as F32", stacklevel=2)
            dense = quant.dequantize_int4(t, tensors[f"{module}.scales"].float())
            w.add_tensor(gguf_name(name), dense.numpy())
        elif kind == "int8_data":
            w.add_tensor(gguf_name(name), q8_0_blocks(t, tensors[f"{module}.scales"]), raw_dtype=Q.Q8_0)
        elif kind == "weight":
            t = t.float() + norm_shift if module.endswith("norm") else t.float()  # Gemma 3's: 1 + w
            w.add_tensor(gguf_name(name), t.numpy())
        elif kind not in quant.QUANT_PARTS:  # Gemma 4's layer scalars and router scales
            w.add_tensor(gguf_name(name), t.float().reshape(-1).numpy())
    if inexact := {module: change for module, change in rounded.items() if change > 0}:
        worst = max(inexact, key=inexact.get)
        warnings.warn(
            f"{len(inexact)} int4 weight(s) with zero points written as Q4_1 with their scales and minimums rounded "
            f"to fp16 (largest relative change {inexact[worst]:.1e}, in {worst})",
            stacklevel=2,
        )


def add_stacked(w: gguf.GGUFWriter, tensors: dict, module: str, kind: str) -> None:
    """Gemma 4's experts of one layer and part (module "layers.N.experts.gate_up_proj"): symmetric int4 as one
    Q4_0 tensor (experts, N, K), anything else as F32 (the expert weights dequantized)."""
    experts = tensors[f"{module}.{kind}"]
    if kind in ("scales", "zeros"):  # a quantized weight's scales or zeros: written with its data
        return
    if kind == "int4_data" and f"{module}.zeros" not in tensors:
        blocks = [q4_0_blocks(q, s) for q, s in zip(experts, tensors[f"{module}.scales"], strict=True)]
        if all(exact for _, exact in blocks):
            w.add_tensor(gguf_name(f"{module}.weight"), np.stack([b for b, _ in blocks]), raw_dtype=Q.Q4_0)
            return
    parts = {p: tensors[f"{module}.{p}"] for p in quant.QUANT_PARTS if f"{module}.{p}" in tensors}
    dense = [
        t.float() if kind == "weight" else quant.dequantize({f"m.{p}": v[e] for p, v in parts.items()}, "m")
        for e, t in enumerate(experts)
    ]
    w.add_tensor(gguf_name(f"{module}.weight"), torch.stack(dense).numpy())
