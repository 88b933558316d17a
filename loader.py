"""Loading a checkpoint into the model, in one place (gpt-fast's _load_model):

from_pretrained: the files (checkpoint.load_weights: any format, any layout) -> config and tensors
in our names -> the weights policy (int4 / int8 / dense) -> q/k/v and gate/up stacked -> from_tensors:
the model built on the meta device, its linears swapped for the quantized ones the tensors ask for
(quant.replace_linears), every tensor checked against it, assigned -> an int8 head's ranker -> the CPU
kernels' packing.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

import checkpoint
import quant
from config import VISION_MODULES, Gemma3Config
from model import Gemma3, fuse_projections


def from_pretrained(
    path_or_hub_id: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    weights: str = "auto",
) -> Gemma3:
    """Load a checkpoint directory, a .safetensors or .gguf file, or a hub repo id.

    weights="auto":  int4 stays int4, dense weights are quantized to int4 (round to nearest, group 32),
                     GGUF tensors stored at more than 4 bits become int8 (see gguf_format.py), and
                     an int8 head ranks the vocabulary with an int4 copy first (Int8Linear.unembed);
    weights="int4":  every linear weight int4;  weights="dense": every weight a float tensor of `dtype`.
    The vision tower and projector (4B/12B/27B) keep their float weights, in `dtype`.
    """
    path = checkpoint.resolve(path_or_hub_id)  # once: a hub id is looked up (downloaded) here
    config, tensors, above_4_bits = load_checkpoint(path)
    # stacked here, so that the unstacked copies are freed before the model is built and packed
    tensors = fuse_projections(convert_weights(tensors, weights, above_4_bits), config.num_layers)
    model = from_tensors(config, tensors, dtype, device)
    if weights == "auto" and isinstance(model.head, quant.Int8Linear):  # an int8 head: rank with int4 first
        head = model.head  # its ranker is cached by the default model's conversion
        head.add_ranker(checkpoint.read_ranker(path, head.out_features, head.in_features))
    return quant.use_cpu_kernels(model, lookups_only=() if model.lm_head is None else (model.embed,))


def from_tensors(
    config: Gemma3Config,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
) -> Gemma3:
    """The model holding a state dict in our names as it is: dense weights, or int4/int8 pairs (the layers
    become Int4Linear / Int8Linear); float tensors cast to `dtype`."""
    tensors = fuse_projections(tensors, config.num_layers)
    with torch.device("meta"):
        model = Gemma3(config)
    quant.replace_linears(model, tensors)
    check_state_dict(model, tensors)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, assign=True)
    return model.to(device).eval().requires_grad_(False)  # for inference: no autograd graph, whoever calls it


def load_checkpoint(path_or_hub_id: str | Path) -> tuple[Gemma3Config, dict[str, torch.Tensor], set[str]]:
    """Config, tensors as stored (our names) and the GGUF weights stored above 4 bits, of any checkpoint."""
    hf_config, tensors, above_4_bits = checkpoint.load_weights(path_or_hub_id)
    if hf_config is None:  # no config.json: recognise a published size by its shapes
        return Gemma3Config.from_shapes({k: tuple(t.shape) for k, t in tensors.items()}), tensors, above_4_bits
    try:
        config = Gemma3Config.from_hf(hf_config)
    except (ValueError, TypeError) as e:  # TypeError: a field of the wrong type
        where = "GGUF metadata" if str(path_or_hub_id).endswith(".gguf") else "config.json"
        raise ValueError(f"{path_or_hub_id}: {where}: {e}") from None
    if config.tie_word_embeddings:  # a stored lm_head is a copy of the embedding
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}
    return config, tensors, above_4_bits


def convert_weights(tensors: dict[str, torch.Tensor], weights: str, above_4_bits: set[str]) -> dict[str, torch.Tensor]:
    """The weights policy (quant.convert_state_dict) applied to the language model; the vision tower and its
    projector keep float weights (the checkpoints keep them bf16, and their 4096-token passes are compute-bound
    anyway): a checkpoint that quantized them too (torchao's recipes quantize every linear) is dequantized."""
    vision_tensors = {k: v for k, v in tensors.items() if k.startswith(VISION_MODULES)}
    text_tensors = {k: v for k, v in tensors.items() if k not in vision_tensors}
    return quant.convert_state_dict(text_tensors, weights, above_4_bits) | quant.convert_state_dict(
        vision_tensors, "dense"
    )


def check_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor the model needs is present with its shape and a dtype fit for its role (int8 for quantized
    data, floating point for the rest), float tensors hold no NaN or infinity, and nothing else is there: errors
    name the tensor."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}")
    for name, want in expected.items():
        t = tensors[name]
        if t.shape != want.shape:
            raise ValueError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(want.shape)}")
        if t.dtype != want.dtype and not (t.is_floating_point() and want.is_floating_point()):
            role = "floating point" if want.is_floating_point() else str(want.dtype).removeprefix("torch.")
            raise ValueError(f"tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}, expected {role}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name} holds NaN or infinite values")
