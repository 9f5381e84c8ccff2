"""Run every kernel benchmark (and, first, the kernel tests compiled on the GPU) in one go.

Each benchmark runs in its own process with a time limit; their ``RESULT {json}`` lines are gathered into
``OUT/kernels.jsonl`` and a short table is printed last. Meant for one call on the GPU machine:

    PYTHONPATH=packages/kernels/src python packages/kernels/benchmarks/run_all.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    ("bench_norms.py", ["--shapes", "16384x4096"]),
    ("bench_rope.py", []),
    ("bench_gated_activation.py", []),
    ("bench_cross_entropy.py", ["--shapes", "8192x128256,8192x256000"]),
    ("bench_fused_linear_cross_entropy.py", ["--shapes", "8192x4096x128256"]),
    ("bench_nf4.py", []),
    ("bench_host_embedding.py", []),
    ("bench_lora.py", []),
    # An 8B LoRA's 32 frozen layers on a 24 GiB budget: crossover, and how long a sequence each mode reaches.
    (
        "bench_offloaded_checkpoint.py",
        ["--layers", "32", "--memory-limit-gib", "24", "--max-seconds", "100", "--modes", "offload,recompute,none"],
    ),
]


def run(cmd: list[str], timeout: float, log) -> tuple[int, list[dict]]:
    """Run ``cmd``, echo its output to ``log``, and return its exit code and parsed RESULT lines."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        code = 124
    log.write(f"$ {' '.join(cmd)}  ({time.perf_counter() - start:.0f} s, exit {code})\n{output}\n")
    log.flush()
    results = [json.loads(line[len("RESULT ") :]) for line in output.splitlines() if line.startswith("RESULT ")]
    return code, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per benchmark")
    parser.add_argument("--tests-timeout", type=float, default=400.0)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--tests-only", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated benchmark names to run (e.g. norms,rope)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, summary = [], []
    with open(out / "kernels.log", "w") as log:
        if not args.skip_tests:
            tests = str(HERE.parent / "tests")
            cmd = [sys.executable, "-m", "pytest", tests, "-p", "no:cacheprovider", "--maxfail=20", "-rf"]
            code, _ = run(cmd, args.tests_timeout, log)
            summary.append(("kernel tests on GPU", "passed" if code == 0 else f"FAILED (exit {code}): see kernels.log"))
        if args.tests_only:
            print("\n".join(f"{name}: {status}" for name, status in summary))
            return 0
        only = [name for name in args.only.split(",") if name]
        for script, extra in BENCHMARKS:
            if only and not any(name in script for name in only):
                continue
            code, results = run([sys.executable, str(HERE / script), *extra], args.timeout, log)
            summary.append((script, "ok" if code == 0 else f"exit {code}"))
            rows += [dict(r, benchmark=script) for r in results]
    with open(out / "kernels.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{'op':<28}{'shape':<22}{'weight':<10}{'provider':<14}{'ms':>9}{'%copy':>7}{'TFLOP/s':>9}{'extraMiB':>10}")
    for r in rows:
        if "provider" not in r:
            continue
        pct, tflops, extra = r.get("pct_copy_bw"), r.get("tflops"), r.get("extra_peak_mib")
        print(
            f"{str(r.get('op', '')):<28}{str(r.get('shape', '')):<22}{str(r.get('weight', '')):<10}"
            f"{str(r['provider']):<14}{r.get('ms', float('nan')):>9.3f}"
            f"{'' if pct is None else f'{pct:.0f}':>7}{'' if tflops is None else f'{tflops:.0f}':>9}"
            f"{'' if extra is None else f'{extra:.0f}':>10}"
        )
    for name, status in summary:
        print(f"{name}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
