"""int4 weights x int8 activations (W4A8) on the CPU: the one native piece, and its reference in plain PyTorch.

llama.cpp multiplies its 4-bit weights by activations rounded to 8 bits (per group of 32, with a float scale),
with integer dot products. w4a8.cpp is that arithmetic as a PyTorch op, gemma::w4a8_linear (and its twin for
int8 weights with per-row scales, gemma::w8a8_linear), built by torch.utils.cpp_extension on first use (about a
minute, once; cached under ~/.cache/torch_extensions) for CPUs with AVX2. `reference` and `reference_int8` below
compute the same numbers from the same integers, bit for bit (tests/test_w4a8.py), so the C++ is checked against
something a reader can follow. Where the op cannot be built (no compiler, no AVX2), `load()` says so in one line
and returns False: PyTorch's kernels (the bf16 path) run instead.
cpu_kernels.py, above it, decides which layers run it and when. Of ours it imports only files (where the build is
recorded).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import torch

from . import files

GROUP_SIZE = 32
SOURCE = Path(__file__).with_name("w4a8.cpp")
BUILD = {  # no FMA contraction (see w4a8.cpp); at::parallel_for threads through OpenMP, as PyTorch's own ops do
    "extra_cflags": ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"],
    "extra_ldflags": ["-fopenmp"],
}

_loaded: bool | None = None


def cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def load() -> bool:
    """Build (once) and load the op; False, with one line on stderr, where it cannot run here."""
    global _loaded
    if _loaded is None:
        _loaded = _build()
    return _loaded


def _build() -> bool:
    if not cpu_has_avx2():
        print("w4a8: this CPU has no AVX2: int8 activations are off, the bf16 path runs", file=sys.stderr)
        return False
    if not SOURCE.exists():
        print(f"w4a8: {SOURCE.name} is missing: int8 activations are off, the bf16 path runs", file=sys.stderr)
        return False
    # what the library was built from, recorded once it built: with the same, the library is loaded as it is
    # (importing cpp_extension and asking ninja whether it is up to date take a second)
    key = hashlib.sha256(SOURCE.read_bytes() + repr((BUILD, torch.__version__)).encode()).hexdigest()
    record = files.cache_dir() / "w4a8-build.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        built = json.loads(record.read_text())
        if built["key"] == key:
            torch.ops.load_library(built["library"])  # (one that no longer loads: built again below)
            return register_fakes()
    from torch.utils import cpp_extension

    name = "gemma_w4a8"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    built = [so.stat().st_mtime for so in build_dir.glob(f"{name}*.so")]
    if not built or max(built) < SOURCE.stat().st_mtime:  # none yet, or older than the source: it builds now
        print("w4a8: compiling the int8-activation CPU kernel (once, about a minute)...", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name, [str(SOURCE)], **BUILD, is_python_module=False,
                           verbose=os.environ.get("W4A8_VERBOSE") == "1")  # fmt: skip
    except Exception as e:  # no compiler, no headers, a failed build: the message's first line says which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"w4a8: the kernel did not build ({first}): int8 activations are off, the bf16 path runs",
              file=sys.stderr)  # fmt: skip
        return False
    library = max(build_dir.glob(f"{name}*.so"), key=lambda so: so.stat().st_mtime)
    with contextlib.suppress(OSError):  # (a cache that cannot be written: ninja is asked next time too)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"key": key, "library": str(library)}))
    return register_fakes()


def register_fakes() -> bool:
    """torch.compile traces the ops by their outputs' shapes alone."""
    torch.library.register_fake("gemma::w4a8_linear")(lambda x, w, s, z: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake("gemma::w8a8_linear")(lambda x, w, s: x.new_empty(x.shape[0], w.shape[0]))
    return True


def linear(x: torch.Tensor, int4_data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) @ W.T for W in quant.py's int4 layout -> (M, N) in x's dtype, through the C++ op (load() first)."""
    return torch.ops.gemma.w4a8_linear(x, int4_data, scales, zeros)


def linear_int8(x: torch.Tensor, int8_data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ W.T for int8 W (N, K) with one bf16 scale per row (quant.Int8Linear) -> (M, N) in x's dtype."""
    return torch.ops.gemma.w8a8_linear(x, int8_data, scales)


# The references: the same integers and the same float32 operations, in plain PyTorch


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) -> (xq int8 (M, K), d float32 (M, K/32), xsum int32 (M, K/32)): per group of 32,
    d = max|x| / 127 and xq = round(x * (1 / d)) (half to even), as llama.cpp's Q8_0 rounds, in natural order."""
    groups = x.float().unflatten(-1, (-1, GROUP_SIZE))  # (M, G, 32)
    d = groups.abs().amax(-1) / 127
    inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    xq = torch.round(groups * inverse[..., None]).to(torch.int8)
    return xq.flatten(-2), d, xq.sum(-1, dtype=torch.int32)


def reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) and the int4 values q (N, K) in [-8, 7] with their scales (and zeros) (N, K/32) -> (M, N) in x's
    dtype, exactly as w4a8.cpp computes it: integer dot products per group, then per group in float32
    t = (isum * scale + xsum * zero) * d, summed over the even groups and the odd groups in order, then the two."""
    xq, d, xsum = quantize_activations(x)
    t = group_dots(xq, q) * scales.float()
    if zeros is not None:
        t = t + xsum.float()[:, None, :] * zeros.float()
    return sum_even_odd(t * d[:, None, :]).to(x.dtype)


def reference_int8(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) and int8 weights w (N, K) with one scale per row (N,) -> (M, N), as w8a8_linear computes it:
    per group t = isum * d, summed over the even and the odd groups, then times the row's scale."""
    xq, d, _ = quantize_activations(x)
    return (sum_even_odd(group_dots(xq, w) * d[:, None, :]) * scales.float()).to(x.dtype)


def group_dots(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The exact integer dot product of each activation row (M, K) and weight row (N, K) per group of 32:
    (M, N, K/32) in float32 (float64 computes them exactly: |isum| <= 32 * 128 * 127)."""
    M, N, G = xq.shape[0], w.shape[0], w.shape[1] // GROUP_SIZE
    xg = xq.double().view(M, G, GROUP_SIZE).transpose(0, 1)  # (G, M, 32)
    wg = w.double().view(N, G, GROUP_SIZE).permute(1, 2, 0)  # (G, 32, N)
    return torch.bmm(xg, wg).permute(1, 2, 0).float()


def sum_even_odd(t: torch.Tensor) -> torch.Tensor:
    """(M, N, G) -> (M, N): the even groups' terms summed in order, the odd groups' likewise, then the two."""
    even, odd = t[..., 0], torch.zeros_like(t[..., 0])
    for g in range(1, t.shape[-1]):
        if g % 2:
            odd = odd + t[..., g]
        else:
            even = even + t[..., g]
    return even + odd
