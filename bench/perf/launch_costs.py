"""CPU cost of one launch of the ops a LoRA step issues most, on tiny operands so that the GPU never holds the CPU
back (the step's GEMMs and Triton launches are issued ~3,000 times a step at Llama-8B, QLoRA, batch 2).

    python bench/perf/launch_costs.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "packages" / "kernels" / "src"))


def per_call_us(fn, calls: int = 3000) -> float:
    """Median over 5 rounds of the host time of ``calls`` calls, per call, in microseconds."""
    fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


def main() -> None:
    from swiftune_kernels.nf4 import dequantize_nf4_forward
    from swiftune_kernels.reference import nf4 as reference

    dev = "cuda"
    a = torch.randn(64, 64, device=dev, dtype=torch.bfloat16)
    b = torch.randn(64, 64, device=dev, dtype=torch.bfloat16)
    out = torch.empty(64, 64, device=dev, dtype=torch.bfloat16)
    out32 = torch.empty(64, 64, device=dev, dtype=torch.float32)
    a32 = a.float()
    rows = []
    for library in ("default", "cublas", "cublaslt"):
        if library != "default":
            torch.backends.cuda.preferred_blas_library(library)
        rows.append((f"mm [{library}]", per_call_us(lambda: torch.mm(a, b))))
        rows.append((f"addmm_ beta=0 alpha [{library}]", per_call_us(lambda: out.addmm_(a, b, beta=0, alpha=0.5))))
        rows.append((f"addmm_ beta=1 [{library}]", per_call_us(lambda: out.addmm_(a, b))))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            rows.append((f"mm under autocast [{library}]", per_call_us(lambda: torch.mm(a, b))))
        try:
            rows.append(
                (f"mm out_dtype=fp32 [{library}]", per_call_us(lambda: torch.mm(a, b, out_dtype=torch.float32)))
            )
        except Exception as error:  # noqa: BLE001
            rows.append((f"mm out_dtype=fp32: {type(error).__name__}", float("nan")))
        try:
            fn = lambda: torch.addmm(out32, a, b, beta=0, alpha=0.5, out_dtype=torch.float32)  # noqa: E731
            rows.append((f"addmm out_dtype=fp32 beta=0 alpha [{library}]", per_call_us(fn)))
            want = 0.5 * (a.float() @ b.float())
            got = fn()
            rows.append((f"  addmm out_dtype max err {(got - want).abs().max().item():.2e} {got.dtype}", 0.0))
        except Exception as error:  # noqa: BLE001
            rows.append((f"addmm out_dtype=fp32: {type(error).__name__}: {str(error)[:80]}", float("nan")))
    rows.append(("to(float32)", per_call_us(lambda: a.to(torch.float32))))
    rows.append(("to(bfloat16) of fp32", per_call_us(lambda: a32.to(torch.bfloat16))))
    rows.append(("torch.empty", per_call_us(lambda: torch.empty(64, 64, device=dev, dtype=torch.bfloat16))))
    weight = torch.randn(64, 128, device=dev, dtype=torch.bfloat16)
    packed, state = reference.quantize_nf4(weight, 64, True, nested_blocksize=4)
    nf4_out = torch.empty(64, 128, device=dev, dtype=torch.bfloat16)
    rows.append(
        (
            "nf4 dequantize (kept launcher)",
            per_call_us(lambda: dequantize_nf4_forward(packed, state, torch.bfloat16, out=nf4_out)),
        )
    )
    from swiftune_kernels import nf4 as nf4_module

    plan = nf4_module._launch_plan(packed, state, torch.bfloat16, {})
    kernel, grid, before, after, options, _ = plan
    rows.append(
        ("nf4 dequantize through kernel[grid]", per_call_us(lambda: kernel[grid](*before, nf4_out, *after, **options)))
    )
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for name, us in rows:
        print(f"{us:8.2f} us  {name}")


if __name__ == "__main__":
    main()
