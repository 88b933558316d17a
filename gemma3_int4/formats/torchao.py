"""torchao checkpoints (PyTorch's own int4 releases of Gemma 3), read without torchao and without running code.

torchao keeps each quantized weight as a tensor subclass; transformers saves a model of them two ways:
- pickled, `pytorch_model*.bin` (push_to_hub(safe_serialization=False)). torch.load(weights_only=True) rebuilds
  a tensor subclass only if its class is allow-listed, so stand-ins of our own (below) are allowed under
  torchao's class names, and keep the pickled attributes. Any other global the pickle names (another class, a
  function such as os.system) is refused before anything runs.
- safetensors: each weight's tensors as "<module>._weight_qdata", "._weight_scale", "._weight_zero_point",
  and its class and attributes as JSON in the file's metadata under "<module>.weight".

Two classes hold the int4 checkpoints, with W (N, K) in groups of g along K:
- IntxUnpackedToInt8Tensor (`pytorch/gemma-3-4b-it-HQQ-INT8-INT4`: int4 linears, an int8 embedding):
  qdata int8 (N, K), one value per byte; scale and zero_point (N, K/g); W = (q - zero_point) * scale.
- Int4Tensor (`pytorch/gemma-3-12b-it-QAT-INT4`): qdata int8 (N, K/2), packed as ours (element 2j in the low
  nibble); scale and zero_point (K/g, N), transposed; W = q * scale + zero_point.
decode() turns them (stand-ins, or torchao's own classes where torchao is imported) into our int4 (zero points
only where they are not all 0) or int8 exactly, whenever g is a multiple of 32 dividing K (int4) or the whole row
(int8); other weights (a partial last group, say) become dense float32.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from .. import quant


class TorchaoTensor(torch.Tensor):
    """A stand-in for a torchao weight: an empty tensor of the weight's shape, whose attributes torch.load sets
    from the pickled state (qdata, scale, zero_point, block_size, ...). It computes nothing."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"{cls.__name__} only carries a checkpoint's tensors; it cannot run {func}")


class IntxUnpackedToInt8Tensor(TorchaoTensor):
    pass


class Int4Tensor(TorchaoTensor):
    pass


class ActivationQuantization(str):
    """Older torchao pickles IntxUnpackedToInt8Tensor's activation_quantization as a str enum: kept as its value."""


# Where torchao's versions put the classes: a pickle names the class's __module__ (torchao 0.18 sets it to
# torchao.quantization; earlier ones left the defining module)
WORKFLOWS = "torchao.quantization.quantize_.workflows"
STAND_INS = [
    (IntxUnpackedToInt8Tensor, "torchao.quantization.IntxUnpackedToInt8Tensor"),
    (IntxUnpackedToInt8Tensor, f"{WORKFLOWS}.intx.intx_unpacked_to_int8_tensor.IntxUnpackedToInt8Tensor"),
    (Int4Tensor, "torchao.quantization.Int4Tensor"),
    (Int4Tensor, f"{WORKFLOWS}.int4.int4_tensor.Int4Tensor"),
    (ActivationQuantization,
     f"{WORKFLOWS}.intx.intx_unpacked_to_int8_tensor.IntxUnpackedToInt8TensorActivationQuantization"),
]  # fmt: skip
CLASSES = {"IntxUnpackedToInt8Tensor": IntxUnpackedToInt8Tensor, "Int4Tensor": Int4Tensor}


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict (pytorch_model*.bin), through torch.load(weights_only=True) with only the stand-ins
    added to what it allows: tensors, and torchao weights as TorchaoTensor."""
    try:
        with torch.serialization.safe_globals(STAND_INS):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"names {found.group(1)}" if found else f"cannot be read safely ({str(e).splitlines()[0]})"
        raise ValueError(
            f"{path}: refused: the pickle {what}, which is not a tensor or a torchao weight we read "
            f"(IntxUnpackedToInt8Tensor, Int4Tensor); a checkpoint's code is never run"
        ) from None
    except Exception as e:  # a damaged or crafted pickle fails in the unpickler's own ways (IndexError, TypeError...)
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict of named tensors")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: the state dict holds values that are not tensors")
    return state


def is_torchao_metadata(metadata: dict[str, str] | None) -> bool:
    return bool(metadata) and "tensor_names" in metadata


def from_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> dict:
    """A torchao safetensors file's tensors and metadata -> its state dict, torchao weights as TorchaoTensor."""
    try:
        names = json.loads(metadata["tensor_names"])
        described = {name: json.loads(metadata[name]) for name in names}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: torchao metadata that is not valid ({e!r})") from None
    well_formed = lambda about: isinstance(about, dict) and isinstance(about.get("_data", {}), dict)
    if not isinstance(names, list) or not all(isinstance(n, str) and well_formed(described[n]) for n in names):
        raise ValueError(f"{path}: torchao metadata must list tensor names, each described by a JSON object")
    state, used = {}, set()
    for name, about in described.items():
        kind = about.get("_type")
        if kind == "Tensor":
            if name not in tensors:
                raise ValueError(f"{path}: the torchao metadata lists {name}, which the file does not hold")
            state[name] = tensors[name]
            used.add(name)
            continue
        if kind not in CLASSES:
            raise ValueError(f"{path}: weight {name} is a torchao {kind}; we read {', '.join(CLASSES)}")
        module, _, attribute = name.rpartition(".")
        prefix = f"{module}._{attribute}_"
        parts = {k.removeprefix(prefix): t for k, t in tensors.items() if k.startswith(prefix)}
        if missing := [p for p in ("qdata", "scale", "zero_point") if p not in parts]:
            raise ValueError(f"{path}: torchao weight {name} comes without {', '.join(missing)}")
        if parts["qdata"].dim() != 2:
            raise ValueError(f"{path}: torchao weight {name} has qdata of shape {tuple(parts['qdata'].shape)}, not 2-D")
        weight = torch.Tensor._make_wrapper_subclass(CLASSES[kind], torch.Size(logical_shape(kind, parts)))
        weight.__dict__.update(parts | {k: json_value(v) for k, v in (about.get("_data") or {}).items()})
        state[name] = weight
        used.update(prefix + p for p in parts)
    for name in tensors.keys() - used:  # tensors the metadata does not describe pass as they are
        state[name] = tensors[name]
    return state


def logical_shape(kind: str, parts: dict[str, torch.Tensor]) -> tuple[int, int]:
    n, k = parts["qdata"].shape
    return (n, 2 * k) if kind == "Int4Tensor" else (n, k)


def json_value(value):
    """torchao's JSON for an attribute -> the value: {"_type": "torch.dtype", "_data": "int4"} -> torch.int4."""
    if isinstance(value, dict) and value.get("_type") == "torch.dtype":
        return getattr(torch, str(value.get("_data")), None)
    return value


BITS = {getattr(torch, f"int{b}"): b for b in range(1, 9)}  # target_dtype -> bits


def decode(state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """A state dict with torchao weights (checkpoint names, "<module>.weight") -> ours: "<module>.weight.int4_data"
    / ".scales" [/ ".zeros"], "<module>.weight.int8_data" / ".scales", or a dense float32 "<module>.weight";
    plain tensors pass."""
    out = {}
    for name, t in state.items():
        if type(t).__name__ not in CLASSES:  # by name: where torchao is imported, torch.load makes its own classes
            out[name] = t
            continue
        try:
            parts = decode_weight(t)
        except (AttributeError, TypeError, ValueError, RuntimeError, IndexError, KeyError, ZeroDivisionError) as e:
            raise ValueError(f"{where}: torchao weight {name} cannot be read ({type(e).__name__}: {e})") from None
        for kind, value in parts.items():
            out[name if kind == "weight" else f"{name}.{kind}"] = value
    return out


def decode_weight(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """One torchao weight (a stand-in, or torchao's own class) -> {"int4_data", "scales"[, "zeros"]},
    {"int8_data", "scales"} or {"weight"}."""
    int4_tensor = type(t).__name__ == "Int4Tensor"
    if t.qdata.dtype != torch.int8 or t.qdata.dim() != 2 or t.scale.dim() != 2 or t.scale.shape != t.zero_point.shape:
        raise ValueError(f"qdata {t.qdata.dtype} {tuple(t.qdata.shape)}, scale {tuple(t.scale.shape)} and zero_point "
                         f"{tuple(t.zero_point.shape)} are not a grouped 2-D int8 weight")  # fmt: skip
    if int4_tensor:  # W = q * scale + zero, scale and zero (K/g, N)
        q, scale, zero = quant.unpack_int4(t.qdata), t.scale.t(), t.zero_point.t()  # (N, K), (N, K/g) each
        zeros = zero.float()
    else:  # W = (q - zp) * scale = q * scale - zp * scale: exact in float32 (8-bit integers times a 16-bit scale)
        q, scale, zero = t.qdata, t.scale, t.zero_point  # (N, K), (N, K/g) each
        zeros = -zero.float() * scale.float()
    n, k = q.shape
    group = int(tuple(t.block_size)[-1]) if len(t.block_size) else 0
    if scale.shape[0] != n or group < 1 or scale.shape[1] != -(-k // group):  # the last group may be partial
        raise ValueError(f"block_size {tuple(t.block_size)} does not fit qdata {(n, k)} and scale {tuple(scale.shape)}")
    column_group = torch.arange(k) // group
    dense = lambda: q.float() * scale.float()[:, column_group] + zeros[:, column_group]
    if getattr(t, "act_pre_scale", None) is not None:  # activations are scaled first: fold that into the weight
        return {"weight": dense() * t.act_pre_scale.float().reshape(1, -1)}
    four_bits = int4_tensor or BITS.get(t.target_dtype, 8) <= 4 and -8 <= int(q.min()) <= int(q.max()) <= 7
    if four_bits and group % quant.GROUP_SIZE == 0 and k % group == 0:
        repeat = group // quant.GROUP_SIZE
        data = t.qdata.contiguous() if int4_tensor else quant.pack_int4(q)  # Int4Tensor's packing is ours already
        pair = {"int4_data": data, "scales": scale.repeat_interleave(repeat, dim=1)}
        if bool((zeros != 0).any()):  # HQQ's zero points are all 0: symmetric, no zeros kept
            exact = zero.dtype if int4_tensor else torch.float32  # Int4Tensor's zeros as stored; -zp * scale
            pair["zeros"] = zeros.to(exact).repeat_interleave(repeat, dim=1)
        return pair
    if group == k and not bool((zero != 0).any()):  # one symmetric scale per row: our int8
        return {"int8_data": q, "scales": scale[:, 0]}
    return {"weight": dense()}
