"""Where the CPU int4 kernels stop beating the dequant-matmul, for the linear shapes of the sizes people run.

    python bench/crossover.py                  # 1B and 4B shapes (fused q/k/v and gate/up), bf16, 2 threads
    python bench/crossover.py --sizes 270m 1b 4b 12b --rows 8 32 64 96 128 256

For each weight (N, K) of a size (qkv_proj, o_proj, gate_up_proj, down_proj) and each batch of M rows, the time
of QuantLinear's two CPU paths on random int4 weights: the kernel (_weight_int4pack_mm_for_cpu) and the tiled
dequant-matmul, and the W4A8 op (w4a8.py, int8 activations). Each crossover is the first measured M at which the
dequant-matmul wins; cpu_kernels.CPU_KERNEL_MAX_ROWS and cpu_kernels.W4A8_MAX_ROWS are chosen from them. Writes
crossover-<name>.json under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma3_int4 import hugepages  # noqa: E402, F401  (before torch: see hugepages.py)

# isort: split
import torch  # noqa: E402

from gemma3_int4 import cpu_kernels, quant, w4a8  # noqa: E402
from gemma3_int4.config import CONFIGS, Gemma3Config  # noqa: E402
from gemma3_int4.model import Gemma3  # noqa: E402


def shapes(size: str) -> dict[str, tuple[int, int]]:
    """The (N, K) of each linear weight in one of the size's blocks, as the model holds them (stacked)."""
    with torch.device("meta"):
        block = Gemma3(Gemma3Config.from_name(size)).layers[0]
    return {name.rpartition(".")[2]: tuple(m.weight.shape) for name, m in block.named_modules()
            if isinstance(m, torch.nn.Linear)}  # fmt: skip


def best_of(fn, repeats: int = 5) -> float:
    """The fastest of a few calls, in ms (after two warm-up calls)."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def measure(n: int, k: int, rows: list[int]) -> dict:
    layer = quant.Int4Linear(k, n)
    layer.int4_data, layer.scales = quant.quantize_int4(torch.randn(n, k))
    cpu_kernels.use_cpu_kernels(layer, activations="bf16")
    kernel, dequant, op = {}, {}, {}
    for m in rows:
        x = torch.randn(m, k, dtype=torch.bfloat16)
        kernel[m] = round(best_of(lambda: cpu_kernels.cpu_matmul(layer, x)), 3)  # noqa: B023
        saved, layer.cpu_kernel = layer.cpu_kernel, None  # the same layer through its dequant-matmul
        dequant[m] = round(best_of(lambda: layer(x)), 3)  # noqa: B023
        layer.cpu_kernel = saved
        if w4a8.load():  # the int8-activation op on the same tensors
            op[m] = round(best_of(lambda: w4a8.linear(x, layer.int4_data, layer.scales, None)), 3)  # noqa: B023
    crossover = next((m for m in rows if dequant[m] < kernel[m]), None)
    w4a8_crossover = next((m for m in op if dequant[m] < op[m]), None)
    return {"kernel_ms": kernel, "dequant_matmul_ms": dequant, "crossover_rows": crossover, "w4a8_ms": op,
            "w4a8_crossover_rows": w4a8_crossover}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["1b", "4b"], choices=list(CONFIGS))
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--name", default="cpu", help="results file stem: crossover-<name>.json (default cpu)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    report = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads, "shapes": {}}
    print(f"{'shape':>24} {'N x K':>13}  crossover (int4 kernel, W4A8)  kernel / dequant-matmul / W4A8 ms at each M")
    for size in args.sizes:
        for name, (n, k) in shapes(size).items():
            r = measure(n, k, args.rows)
            report["shapes"][f"{size} {name}"] = {"n": n, "k": k, **r}
            cells = " ".join(f"{m}:{r['kernel_ms'][m]}/{r['dequant_matmul_ms'][m]}/{r['w4a8_ms'].get(m)}"
                             for m in args.rows)  # fmt: skip
            crossovers = f"{r['crossover_rows']}, {r['w4a8_crossover_rows']}"
            print(f"{size + ' ' + name:>24} {f'{n}x{k}':>13}  {crossovers:>29}  {cells}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"crossover-{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
