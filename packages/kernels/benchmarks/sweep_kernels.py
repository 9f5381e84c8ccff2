"""Sweep the candidate launch configurations of four ops in one GPU call, and name the winner of each.

Ops and what is compared (bf16, CUDA-graph GPU time from _timing.py, do_bench where capture fails):

- cross_entropy and rope: see sweep_ce_rope.py (ours' variants against the default, Liger and torch.compile).
- nf4 dequantization to bf16 of 8B-layer weights (4096 x 14336, 4096 x 4096), with and without double
  quantization: the per-element kernel (default) against the per-byte kernel (code lookup "load" / "tree" /
  "pair", bytes a program, warps, hand or hardware bf16 rounding), vs bitsandbytes when importable. Bit-exactness
  vs bitsandbytes (else the reference) is part of every row.
- lora_qkv, fwd+bwd (dx and all adapters), 8192 tokens, hidden 4096, q 4096, k/v 1024, r 16, NF4 and bf16 bases:
  "separate" (default) against "fused", with the default and the best NF4 configuration, vs peft when importable;
  CUDA-graph and do_bench times both (their gap is host overhead), extra peak memory, error vs peft / default.

Prints one ``RESULT {json}`` line per measurement and, last, the best configuration per op, its % of the copy
bandwidth (memory-bound ops) and the one-line ``CONFIG`` change that makes it the default, then a table of every
cross-entropy / RoPE provider. With several ops, each op runs in its own process (its share of --budget-s): a fresh
CUDA context, so that memory one op leaves behind (the 2026-11-23 sweep ended at 78 GiB held after cross-entropy)
cannot make the next op's CUDA-graph capture fail and fall back to host-bound do_bench timing.

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python packages/kernels/benchmarks/sweep_kernels.py
    ... sweep_kernels.py --ops cross_entropy,rope --budget-s 400
    ... sweep_kernels.py --smoke            # tiny shapes, CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

import torch
from sweep_ce_rope import print_table, sweep_cross_entropy, sweep_rope

OPS = ("cross_entropy", "rope", "nf4", "qkv")


class Sweep:
    """Shared state: device, copy ceiling, time budget, and the rows printed so far."""

    def __init__(self, args):
        self.args, self.smoke = args, args.smoke
        self.on_gpu = torch.cuda.is_available() and not args.smoke
        self.device = torch.device("cuda" if self.on_gpu else "cpu")
        self.deadline = time.perf_counter() + args.budget_s
        self.op_deadline = self.deadline
        self.rows, self.copy_gbps = [], None

    def left_s(self) -> float:
        return min(self.deadline, self.op_deadline) - time.perf_counter()

    def time(self, fn, do_bench: bool = False) -> tuple[float, dict]:
        import _timing

        if not self.on_gpu:
            return _timing.time_ms(fn, False, self.smoke)
        info = {}
        try:
            ms, info["timing"] = _timing._cudagraph_ms(fn, target_ms=self.args.target_ms), "cudagraph"
        except Exception as error:  # a host sync in fn: do_bench still measures it
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            ms, info["timing"] = _timing._do_bench_ms(fn), f"do_bench (capture failed: {repr(error)[:300]})"
            do_bench = False
        if do_bench:
            info["ms_do_bench"] = round(_timing._do_bench_ms(fn), 4)
        return ms, info

    def emit(self, row: dict) -> dict:
        if "gbps" in row and self.copy_gbps:
            row["pct_copy_bw"] = round(100 * row["gbps"] / self.copy_gbps, 1)
        print("RESULT " + json.dumps(row), flush=True)
        self.rows.append(row)
        return row

    def run(self, op, shape, candidate, config, step, min_bytes=None, check=None, do_bench=False, **extra):
        """Time ``step`` (after ``check()``, whose dict joins the row); one row, errors and budget included.

        A candidate named "... (default)" is the current default configuration, the baseline of the summary.
        """
        row = {"op": op, "shape": shape, "candidate": candidate, "config": config, **extra}
        row["is_default"] = "(default)" in candidate
        if self.left_s() <= 0:
            return self.emit({**row, "skipped": "time budget"})
        try:
            if check is not None:
                row.update(check())
                if not row.get("valid", True):  # wrong results: not worth timing (and a broken wait can be slow)
                    return self.emit(row)
            ms, info = self.time(step, do_bench=do_bench)
            row.update(ms=round(ms, 4), **info)
            if min_bytes:
                row["gbps"] = round(min_bytes / ms / 1e6, 1)
        except Exception as error:  # one failing candidate must not lose the others
            row["error"] = repr(error)[:300]
        if self.on_gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return self.emit(row)


def _best(rows, **match):
    ok = [r for r in rows if "ms" in r and all(r.get(k) == v for k, v in match.items()) and r.get("valid", True)]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def _extra_peak_mib(sweep, step):
    if not sweep.on_gpu:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


# --- NF4 ---------------------------------------------------------------------------------------------------------


NF4_GRID = [(2048, 4), (2048, 8), (4096, 8), (8192, 8), (8192, 16)]  # (packed bytes a program, warps)


def _quantize(weight, nested):
    """(packed, state, bitsandbytes' dequantization or None): bitsandbytes when importable, else the reference."""
    try:
        import bitsandbytes.functional as bnb_f

        packed, state = bnb_f.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested, blocksize=64)
        return packed, state, lambda: bnb_f.dequantize_4bit(packed, state)
    except ImportError:
        from swiftune_kernels.reference.nf4 import quantize_nf4

        packed, state = quantize_nf4(weight, 64, compress_statistics=nested)
        return packed, state, None


def _nf4_case(sweep, weight, nested, configs, try_hw_round):
    from swiftune_kernels.nf4 import dequantize_nf4_forward
    from swiftune_kernels.reference.nf4 import dequantize_nf4 as reference

    packed, state, bnb = _quantize(weight, nested)
    expected = bnb() if bnb is not None else reference(packed, state)
    numel, shape = weight.numel(), "x".join(map(str, weight.shape))
    # the packed indices (n / 2), one scale a 64-block (uint8 when double quantized), the bf16 output (2 n)
    min_bytes = numel / 2 + (numel // 64) * (1 if nested else 4) + 2 * numel
    op = "nf4_dequant" + ("_nested" if nested else "")

    def run(name, config):
        def check():
            exact = bool(torch.equal(dequantize_nf4_forward(packed, state, torch.bfloat16, **config), expected))
            return {"bit_exact": exact, "valid": exact}

        step = lambda: dequantize_nf4_forward(packed, state, torch.bfloat16, **config)  # noqa: E731
        sweep.run(op, shape, name, config, step, min_bytes, check)

    for name, config in configs:
        run(name, config)
    best = _best(sweep.rows, op=op, shape=shape)
    if try_hw_round and best and best["config"].get("kernel") == "bytes":
        run(best["candidate"] + " hw-round", dict(best["config"], hand_round=False))  # the GPU's own rounding
    if bnb is not None:
        sweep.run(op, shape, "bitsandbytes", None, bnb, min_bytes, competitor=True)


def sweep_nf4(sweep):
    shapes = [(64, 256)] if sweep.smoke else [(4096, 14336), (4096, 4096)]
    grid = [(64, 1)] if sweep.smoke else NF4_GRID
    full = [("elements (default)", dict(kernel="elements"))]
    for lut in ("load", "tree", "pair"):
        for b, w in grid:
            config = dict(kernel="bytes", lut=lut, words=True, bytes_per_program=b, num_warps=w)
            full.append((f"words {lut} b={b} w={w}", config))
    for lut in ("load", "pair"):
        config = dict(kernel="bytes", lut=lut, words=False, bytes_per_program=grid[1 % len(grid)][0], num_warps=8)
        full.append((f"bytes {lut} b={config['bytes_per_program']} w=8", config))
    first = "x".join(map(str, shapes[0]))
    for i, (rows, cols) in enumerate(shapes):
        weight = torch.randn(rows, cols, device=sweep.device, generator=torch.Generator(sweep.device).manual_seed(0))
        for nested in (False, True):
            configs = full
            if i > 0:  # further shapes: the default and the winner of the first shape
                best = _best(sweep.rows, op="nf4_dequant" + ("_nested" if nested else ""), shape=first)
                configs = full[:1] + ([(best["candidate"], best["config"])] if best and best["config"] else [])
            _nf4_case(sweep, weight.to(torch.bfloat16), nested, configs, try_hw_round=i == 0)


# --- LoRA QKV ----------------------------------------------------------------------------------------------------


def _qkv_setup(sweep, base):
    """(peft model or None, lora_qkv's weight arguments, tokens, dims); NF4 by bitsandbytes, else the reference."""
    dims, tokens, rank = ((64, 160, 32), 16, 4) if sweep.smoke else ((4096, 14336, 1024), 8192, 16)
    try:
        from bench_lora import _build

        model, layers = _build("qkv", base, dims, rank, sweep.device)
        args = []
        for layer in layers.values():
            args += [layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            args.append(layer.scaling["default"])
        return model, args, tokens, dims
    except ImportError:
        import types

        from swiftune_kernels.reference.nf4 import quantize_nf4

        args = []
        for out in (dims[0], dims[2], dims[2]):
            w = (torch.randn(out, dims[0], device=sweep.device) / dims[0] ** 0.5).to(torch.bfloat16)
            if base == "nf4":
                packed, state = quantize_nf4(w, 64, compress_statistics=True)
                state.dtype = torch.bfloat16
                w = types.SimpleNamespace(data=packed, quant_state=state)
            a = torch.randn(rank, dims[0], device=sweep.device).div_(dims[0] ** 0.5).requires_grad_()
            b = torch.randn(out, rank, device=sweep.device).mul_(0.02).requires_grad_()
            args += [w, a, b, 2.0]
        return None, args, tokens, dims


def _qkv_base(sweep, qkv_module, nf4_module, base, nf4_configs):
    from swiftune_kernels import lora_qkv

    default, nf4_default = dict(qkv_module.CONFIG), dict(nf4_module.CONFIG)
    model, args, tokens, dims = _qkv_setup(sweep, base)
    shape = f"{tokens}x{dims[0]}x{dims[2]}"
    adapters = [t for i, t in enumerate(args) if i % 4 in (1, 2)]
    x = torch.randn(1, tokens, dims[0], device=sweep.device).to(torch.bfloat16).requires_grad_()
    with torch.no_grad():
        dys = [torch.randn_like(o) for o in lora_qkv(x, *args)]

    def ours(x_):
        return lora_qkv(x_, *args)

    def results(fn):
        outs = fn(x)
        return [o.detach().float() for o in outs] + [g.float() for g in torch.autograd.grad(outs, [x, *adapters], dys)]

    def step_of(fn):
        return lambda: torch.autograd.grad(fn(x), [x, *adapters], dys)

    ref = results(ours)

    def check():
        err = max(((a - b).norm() / b.norm()).item() for a, b in zip(results(ours), ref, strict=True))
        return {"rel_err_vs_default": err, "valid": err < 2e-2, "extra_peak_mib": _extra_peak_mib(sweep, step_of(ours))}

    if model is not None:
        peak = _extra_peak_mib(sweep, step_of(model))
        sweep.run("lora_qkv", shape, "peft", None, step_of(model), do_bench=True, weight=base, competitor=True,
                  extra_peak_mib=peak)  # fmt: skip
    variants = [("separate (default)", dict(variant="separate")), ("fused", dict(variant="fused"))]
    variants.append(("fused dy_concat", dict(variant="fused", dy_concat=True)))
    if base == "bf16":
        variants.append(("fused dense_concat", dict(variant="fused", dense_concat=True)))
        variants.append(("fused dense_concat dy_concat", dict(variant="fused", dense_concat=True, dy_concat=True)))
    for nf4_name, nf4_config in nf4_configs if base == "nf4" else nf4_configs[:1]:
        nf4_module.CONFIG.update(nf4_default, **nf4_config)
        for name, config in variants:
            qkv_module.CONFIG.update(default, **config)
            label = name if base == "bf16" else f"{name} / {nf4_name}"
            if nf4_config:  # not the current NF4 default: not the baseline row either
                label = label.replace(" (default)", "")
            config = {"lora_qkv": config, "nf4": nf4_config}
            sweep.run("lora_qkv", shape, label, config, step_of(ours), check=check, do_bench=True, weight=base)
    qkv_module.CONFIG.update(default)
    nf4_module.CONFIG.update(nf4_default)


def sweep_qkv(sweep):
    qkv_module = importlib.import_module("swiftune_kernels.lora_qkv")
    nf4_module = importlib.import_module("swiftune_kernels.nf4")
    nf4_configs = [("nf4 default", {})]
    best = _best(sweep.rows, op="nf4_dequant_nested", shape="4096x14336") or _best(sweep.rows, op="nf4_dequant_nested")
    if best and best["config"] and best["config"].get("kernel") != "elements":
        nf4_configs.append((f"nf4 {best['candidate']}", best["config"]))
    for base in ("bf16", "nf4"):  # nf4 by bitsandbytes and peft when importable, else the reference quantizer
        try:
            _qkv_base(sweep, qkv_module, nf4_module, base, nf4_configs)
        except Exception as error:
            sweep.emit({"op": "lora_qkv", "weight": base, "candidate": "setup", "error": repr(error)[:300]})
        if sweep.on_gpu:
            torch.cuda.empty_cache()


# --- summary -----------------------------------------------------------------------------------------------------

CONFIG_FILES = {
    "cross_entropy": "cross_entropy.py",
    "rope": "rope.py",
    "nf4_dequant": "nf4.py",
    "nf4_dequant_nested": "nf4.py",
    "lora_qkv": "lora_qkv.py (+ nf4.py)",
    "fused_linear_cross_entropy": "cross_entropy.py (its kernel)",
}


def summarize(sweep):
    print(f"\ncopy bandwidth {sweep.copy_gbps} GB/s; best per op (valid rows only: gradients / bits checked)")
    print(f"{'op':<27} {'shape':<19} {'case':<14} {'default':>8} {'best':>8} {'speedup':>7} {'%copy':>6}  rival / best")

    def case_of(r):
        return r.get("layout") or r.get("weight") or r.get("case") or ""

    keys = []
    for r in sweep.rows:
        if r.get("op") and r.get("shape") and (r["op"], r["shape"], case_of(r)) not in keys:
            keys.append((r["op"], r["shape"], case_of(r)))
    for op, shape, case in keys:
        rows = [r for r in sweep.rows if (r.get("op"), r.get("shape"), case_of(r)) == (op, shape, case)]
        ours = [r for r in rows if not r.get("competitor")]
        default = next((r for r in ours if r.get("is_default") and "ms" in r), None)
        best, rival = _best(ours), _best([r for r in rows if r.get("competitor")])
        if best is None:
            continue
        cells = [
            f"{default['ms']:.4f}" if default else "-",
            f"{best['ms']:.4f}",
            f"{default['ms'] / best['ms']:.2f}x" if default else "-",
            f"{best['pct_copy_bw']:.1f}" if "pct_copy_bw" in best else "-",
        ]
        rival_text = f"{rival['candidate']} {rival['ms']:.4f} ms" if rival else "-"
        line = f"{op:<27} {shape:<19} {case:<14} {cells[0]:>8} {cells[1]:>8} {cells[2]:>7} {cells[3]:>6}"
        print(f"{line}  {rival_text} / {best['candidate']}")
        summary = {"summary": op, "shape": shape, "case": case, "best": best["candidate"], "config": best["config"]}
        summary.update(file=CONFIG_FILES.get(op), ms=best["ms"], default_ms=default["ms"] if default else None)
        summary.update(competitor=rival["candidate"] if rival else None, competitor_ms=rival["ms"] if rival else None)
        print("RESULT " + json.dumps(summary), flush=True)
    print("\nTo make a winner the default: merge its 'config' into CONFIG at the top of the file its summary names.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="stop starting new candidates after this (210 s; --smoke: 1200 s)"
    )
    parser.add_argument("--target-ms", type=float, default=40.0, help="GPU time of one CUDA-graph replay")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one op of a multi-op run
    args = parser.parse_args()
    if args.budget_s is None:
        args.budget_s = 1200.0 if args.smoke else 210.0  # the interpreter is ~1000x slower; the smoke runs every path
    ops = args.ops.split(",")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        sys.exit(f"unknown op {unknown[0]!r}; choose from {OPS}.")
    if len(ops) > 1:
        _run_each_op_in_its_process(args, ops)
        return
    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu:
        if not args.smoke:
            sys.exit("sweep_kernels.py needs a CUDA GPU; use --smoke for a CPU check under Triton's interpreter.")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    import _timing

    sweep = Sweep(args)
    start = time.perf_counter()
    sweep.copy_gbps = round(_timing.copy_bandwidth_gbps(sweep.device, sweep.on_gpu, args.smoke), 1)
    device_name = torch.cuda.get_device_name() if sweep.on_gpu else "cpu (Triton interpreter)"
    print("RESULT " + json.dumps({"copy_bandwidth_gbps": sweep.copy_gbps, "device": device_name}), flush=True)
    for i, op in enumerate(ops):
        begin = time.perf_counter()
        # each op gets an even share of what is left, so that a slow one cannot starve the last; time an op does
        # not use goes to the next
        sweep.op_deadline = begin + (sweep.deadline - begin) / (len(ops) - i)
        try:
            {"cross_entropy": sweep_cross_entropy, "rope": sweep_rope, "nf4": sweep_nf4, "qkv": sweep_qkv}[op](sweep)
        except Exception as error:  # an op that fails as a whole still leaves the others' rows
            sweep.emit({"op": op, "error": repr(error)[:300]})
        print(f"# {op}: {time.perf_counter() - begin:.0f} s", flush=True)
        if sweep.on_gpu:
            torch.cuda.empty_cache()
    summarize(sweep)
    if not args.child:
        print_table(sweep.rows, sweep.copy_gbps)
    print(f"# total {time.perf_counter() - start:.0f} s")


def _run_each_op_in_its_process(args, ops):
    """One process an op, each with its share of the budget left; the table of all their rows is printed last."""
    start = time.perf_counter()
    rows = []
    for i, op in enumerate(ops):
        # cross-entropy (two 4-8 GiB shapes, torch.compile of each) gets twice the share of the others
        weights = [2.0 if o == "cross_entropy" else 1.0 for o in ops[i:]]
        share = max(1.0, (args.budget_s - (time.perf_counter() - start)) * weights[0] / sum(weights))
        cmd = [sys.executable, os.path.abspath(__file__), "--ops", op, "--budget-s", f"{share:.0f}", "--child"]
        cmd += ["--target-ms", str(args.target_ms)] + (["--smoke"] if args.smoke else [])
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
            for line in proc.stdout:
                print(line, end="", flush=True)
                if line.startswith("RESULT {"):
                    rows.append(json.loads(line[len("RESULT ") :]))
        if proc.returncode:
            print(f"# {op}: its process exited with {proc.returncode}", flush=True)
    copy_gbps = next((r["copy_bandwidth_gbps"] for r in rows if "copy_bandwidth_gbps" in r), None)
    print_table(rows, copy_gbps)
    print(f"# total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
