"""Run a named batch of bench/perf measurements, each system in its own process, and print the table last.

    python bench/perf/suite.py call1|call2|call3|curve|ctx [--profile] [--smoke] [--shapes-extra]

call1: 1B LoRA (bf16), batch 8 x 2048: transformers + peft (fp32 and bf16 adapters), + Liger (bf16 adapters),
       unsloth, swiftune (default checkpointing) and swiftune "auto".
call2: 8B QLoRA (NF4), batch 2 x 2048: transformers + peft, + Liger, swiftune, swiftune "auto".
call3: 8B QLoRA unsloth; 8B LoRA (bf16), batch 2 x 2048: + Liger (bf16 adapters), swiftune, swiftune "auto".
curve: 30 steps of 1B LoRA (batch 4 x 2048, a new seeded batch each step), swiftune vs transformers + peft
       (bf16 adapters): both loss curves, their largest gap, loss_curve.png (matplotlib).
call5: 8B QLoRA, swiftune "auto" at batch 4 and 8 x 2048, and swiftune's default (with --profile: its top kernels).
call6: 8B QLoRA, unsloth at batch 4 x 2048.
final1b, final8b: the record for issue 12's same-memory targets: 1B LoRA (peft bf16, Liger bf16, unsloth,
       swiftune default and with a 1.2 GiB budget), 8B QLoRA (unsloth, swiftune default, 0.6 GiB, 0.6 GiB with
       gate and up parked, peft).
attn8b: swiftune 8B QLoRA (ckpt=0.6) with cuDNN attention and with it off (flash), twice each, alternating.
park8b: unsloth 8B QLoRA, then swiftune ckpt=0.6 without and with the MLP's gate and up parked on the host for
       the recompute (--park gate,up), alternating, three of each.
gate8b: unsloth 8B QLoRA, then swiftune ckpt=0.6 with nothing, gate only, and gate and up parked, twice, in turn.
embed8b: unsloth 8B QLoRA with and without offload_embedding, then swiftune ckpt=0.6, and with the input embedding in
       host memory: ckpt=0.6 with CUDA graphs, and ckpt=1.6 eager, twice in turn.
slot8b: unsloth 8B QLoRA, then swiftune with CUDA graphs and the embedding in host memory: ckpt=0.6, and ckpt=0.1
       with the MLP's gate parked through the graphs' slots (--park gate), twice, in turn; then ckpt=0.6 parked.
graph8b: unsloth 8B QLoRA, then swiftune ckpt=0.6 with the checkpointed layers eager and replayed from CUDA graphs.
ab1b, ab8b: swiftune's recompute with and without the down-projection skip, and memory-aware budgets near unsloth's
       peak: 1B LoRA batch 8, 8B QLoRA batch 2.
ctx:   swiftune 8B QLoRA, batch 1: the longest sequence that trains (409,600 first, then up or down), 512k max.
--smoke runs each call's logic on the CPU with a tiny shape (Liger / unsloth skipped with the reason when absent).
Results: RESULT json lines on stdout, and $OUT/<call>.jsonl (default /tmp/out).
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


def calls(smoke: bool, extra_shapes: bool) -> dict[str, list[dict]]:
    """Each call: the processes it runs, in order (keyword arguments of train_one.py, and a time limit)."""
    one_b = dict(shape="1b", quant="bf16", points="8x2048", warmup=5, steps=10, limit=150)
    eight_q = dict(shape="8b", quant="nf4", points="2x2048", warmup=3, steps=6, limit=170)
    eight = dict(shape="8b", quant="bf16", points="2x2048", warmup=3, steps=6, limit=150)
    table = {
        "call1": [
            {**one_b, "system": s, **({"limit": 260} if s == "unsloth" else {})}
            for s in ("peft", "peft-bf16", "liger-bf16", "unsloth", "swiftune", "swiftune-auto")
        ],
        "call2": [{**eight_q, "system": s} for s in ("swiftune", "swiftune-auto", "peft", "liger")],
        "call3": [{**eight_q, "system": "unsloth", "limit": 280}]
        + [{**eight, "system": s} for s in ("liger-bf16", "swiftune", "swiftune-auto")],
        # The memory-aware mode given the whole GPU: larger batches of 8B QLoRA; --profile adds the swiftune
        # default's top kernels. call6: unsloth at the same larger batch, for the same-batch ratio.
        "call5": [
            {**eight_q, "system": "swiftune-auto", "points": "4x2048,8x2048", "limit": 260},
            {**eight_q, "system": "swiftune"},
        ],
        "call6": [{**eight_q, "system": "unsloth", "points": "4x2048", "limit": 300}],
        # The recompute that skips the down projection, against the one that does not, and budgets of the
        # memory-aware mode near unsloth's peak (activations GiB: one and two layers kept); --profile: top kernels.
        "ab1b": [
            {**one_b, "system": "swiftune", "no_recompute_skip": True},
            {**one_b, "system": "swiftune"},
            {**one_b, "system": "swiftune", "checkpointing": "1.2"},
            {**one_b, "system": "swiftune", "checkpointing": "2.3"},
        ],
        # The record: the peers and swiftune (default, and the memory-aware mode with a GiB budget that keeps the
        # peak at or under unsloth's) in one call each.
        "final1b": [
            {**one_b, "system": "peft-bf16"},
            {**one_b, "system": "liger-bf16"},
            {**one_b, "system": "unsloth", "limit": 260},
            {**one_b, "system": "swiftune"},
            {**one_b, "system": "swiftune", "checkpointing": "1.2"},
        ],
        "final8b": [
            {**eight_q, "system": "unsloth", "limit": 280},
            {**eight_q, "system": "swiftune"},
            {**eight_q, "system": "swiftune", "checkpointing": "0.6"},
            {**eight_q, "system": "swiftune", "checkpointing": "0.6", "park": "gate,up"},
            {**eight_q, "system": "peft"},
        ],
        "attn8b": [  # A, B, A, B: the host drifts less within a pair than across a call
            {**eight_q, "system": "swiftune", "checkpointing": "0.6", **({"no_cudnn_attention": True} if b else {})}
            for _ in range(2)
            for b in (False, True)
        ],
        "park8b": [{**eight_q, "system": "unsloth", "limit": 280}]
        + [
            {**eight_q, "system": "swiftune", "checkpointing": "0.6", **({"park": "gate,up"} if park else {})}
            for _ in range(3)
            for park in (False, True)
        ],
        # gate only halves the parked bytes (the link stays ahead of the compute), gate and up saves the most work
        "gate8b": [{**eight_q, "system": "unsloth", "limit": 280}]
        + [
            {**eight_q, "system": "swiftune", "checkpointing": "0.6", **({"park": park} if park else {})}
            for _ in range(2)
            for park in ("", "gate", "gate,up")
        ],
        # the frozen input embedding in host memory (both systems), and what swiftune spends the memory on: the
        # graphs, or two more un-checkpointed layers (a 1.6 GiB budget), in turn
        "embed8b": [
            {**eight_q, "system": "unsloth", "limit": 280},
            {**eight_q, "system": "unsloth", "offload_embeddings": True, "limit": 280},
            {**eight_q, "system": "swiftune", "checkpointing": "0.6"},
        ]
        + [
            {**eight_q, "system": "swiftune", "offload_embeddings": True, **run}
            for _ in range(2)
            for run in ({"checkpointing": "0.6", "graphs": True}, {"checkpointing": "1.6"})
        ],
        # the graphed step with the gate parked through fixed slots (slot_parking), against the same without, in turn
        "slot8b": [{**eight_q, "system": "unsloth", "limit": 280}]
        + [
            {**eight_q, "system": "swiftune", "graphs": True, "offload_embeddings": True, **run}
            for _ in range(2)
            for run in ({"checkpointing": "0.6"}, {"checkpointing": "0.1", "park": "gate"})
        ]
        + [
            {
                **eight_q,
                "system": "swiftune",
                "graphs": True,
                "offload_embeddings": True,
                "checkpointing": "0.6",
                "park": "gate",
            }
        ],
        # The record row of the ninth round against unsloth in turn (A, B, A, B), with held memory (memory_trace) and
        # the graphs' captures warmed by matmuls instead of a layer run.
        "held8b": [
            {**eight_q, **run}
            for _ in range(2)
            for run in (
                {"system": "unsloth", "limit": 280},
                {
                    "system": "swiftune",
                    "graphs": True,
                    "offload_embeddings": True,
                    "checkpointing": "0.1",
                    "park": "gate",
                },
            )
        ],
        # 1B LoRA: unsloth and the memory-aware mode with a 1.2 GiB budget (the fourth round's record row) in turn.
        "held1b": [
            {**one_b, **run}
            for _ in range(2)
            for run in ({"system": "unsloth", "limit": 260}, {"system": "swiftune", "checkpointing": "1.2"})
        ],
        # The memory-aware mode ("auto": keeps as many layers as 80 GB allow) against unsloth in the same call, at
        # unsloth's batch 2 and at batch 4 (both systems).
        "aware8b": [
            {**eight_q, "system": "unsloth", "points": "2x2048,4x2048", "limit": 280},
            {**eight_q, "system": "swiftune-auto", "points": "2x2048,4x2048", "limit": 260},
        ],
        # checkpointed layers (forward, recompute and backward) replayed from CUDA graphs, against eager, in turn
        "graph8b": [{**eight_q, "system": "unsloth", "limit": 280}]
        + [
            {**eight_q, "system": "swiftune", "checkpointing": ckpt, **({"graphs": True} if graphs else {})}
            for _ in range(2)
            for ckpt in ("0.6",)
            for graphs in (False, True)
        ],
        "ab8b": [
            {**eight_q, "system": "swiftune", "no_recompute_skip": True},
            {**eight_q, "system": "swiftune"},
            {**eight_q, "system": "swiftune", "checkpointing": "0.6"},
            {**eight_q, "system": "swiftune", "checkpointing": "1.1"},
        ],
        "curve": [
            dict(shape="1b", quant="bf16", points="4x2048", curve=30, system=s, limit=200)
            for s in ("peft-bf16", "swiftune")
        ],
        "ctx": [
            dict(
                shape="8b",
                quant="nf4",
                points="",
                system="swiftune",
                max_positions=524288,
                limit=540,
                ctx="409600,524288",
                ctx_down="262144,327680,368640",
                time_limit=520,
            )
        ],
    }
    if extra_shapes:
        table["call4"] = [
            dict(shape=shape, quant="nf4", points="2x2048", warmup=3, steps=6, system=s, limit=170)
            for shape in ("qwen7b", "gemma9b")
            for s in ("peft", "swiftune")
        ]
    if smoke:
        for runs in table.values():
            for run in runs:
                run.update(shape="tiny", warmup=1, steps=2, limit=900)
                if run.get("points"):
                    run["points"] = "2x64"
                if run.get("curve"):
                    run.update(curve=3, points="2x64")
                if run.get("ctx"):
                    run.update(ctx="256,512", ctx_down="128", max_positions=4096, time_limit=900)
    return table


def command(run: dict, profile: bool) -> list[str]:
    args = [sys.executable, str(HERE / "train_one.py"), "--system", run["system"], "--shape", run["shape"]]
    args += ["--quant", run["quant"], "--points", run["points"]]
    for key in ("warmup", "steps", "curve", "ctx", "ctx_down", "time_limit", "max_positions"):
        if key in run:
            args += [f"--{key.replace('_', '-')}", str(run[key])]
    if "checkpointing" in run:
        args += ["--checkpointing", run["checkpointing"]]
    if run.get("no_recompute_skip"):
        args.append("--no-recompute-skip")
    if run.get("no_cudnn_attention"):
        args.append("--no-cudnn-attention")
    if run.get("park"):
        args += ["--park", run["park"]]
    if run.get("graphs"):
        args.append("--graphs")
    if run.get("offload_embeddings"):
        args.append("--offload-embeddings")
    if profile and run["system"] == "swiftune" and run.get("points") and not run.get("checkpointing"):
        args.append("--profile")
    return args


def matmul_peak_tflops() -> float | None:
    """The measured bf16 matmul ceiling (8192^3, median of 20 after warm-up), the denominator of the MFU."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return round(2 * 8192**3 / times[len(times) // 2] / 1e12, 1)


def run_call(name: str, runs: list[dict], profile: bool, out_dir: Path) -> list[dict]:
    results = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    for run in runs:
        label = f"{run['system']} {run['shape']} {run['quant']} {run.get('points') or 'ctx'}"
        print(f"[{time.strftime('%H:%M:%S')}] {label}", flush=True)
        start = time.time()
        run_env = dict(env)
        unsloth_site = os.environ.get("SWIFTUNE_BENCH_UNSLOTH_SITE")
        if run["system"] == "unsloth" and unsloth_site:
            # unsloth's pinned needs (trl, datasets, ...) go on this process's path only.
            run_env["PYTHONPATH"] = unsloth_site + os.pathsep + env.get("PYTHONPATH", "")
        try:
            proc = subprocess.run(
                command(run, profile), env=run_env, capture_output=True, text=True, timeout=run["limit"], check=False
            )
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as expired:
            output = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
            timed_out = {
                "system": run["system"],
                "shape": run["shape"],
                "quant": run["quant"],
                "timeout_s": run["limit"],
            }
            output += f"\nRESULT {json.dumps(timed_out)}"
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        for line in lines:
            results.append(json.loads(line[len("RESULT ") :]))
            print(line, flush=True)
        for line in output.splitlines():
            shown = line.startswith(("note:", "built", "top kernels", "GPU kernels")) or "Self CUDA" in line
            if shown or line.startswith(" "):
                if profile or not line.startswith(" "):
                    print("   " + line)
        if not lines:
            print("   no RESULT; last output:\n" + "\n".join(output.splitlines()[-15:]))
        print(f"   ({time.time() - start:.0f}s)", flush=True)
    with open(out_dir / f"{name}.jsonl", "w") as f:
        for result in results:
            f.write(json.dumps(result) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = (
        "call1",
        "call2",
        "call3",
        "call4",
        "call5",
        "call6",
        "ab1b",
        "ab8b",
        "attn8b",
        "park8b",
        "gate8b",
        "graph8b",
        "embed8b",
        "slot8b",
        "held8b",
        "held1b",
        "aware8b",
        "final1b",
        "final8b",
        "curve",
        "ctx",
    )
    parser.add_argument("call", choices=names)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, every call's logic")
    parser.add_argument("--profile", action="store_true", help="top-15 CUDA kernels of the swiftune runs")
    parser.add_argument("--shapes-extra", action="store_true", help="call4: Qwen2.5-7B and Gemma-2-9B shapes")
    args = parser.parse_args()
    out_dir = Path(os.environ.get("OUT", "/tmp/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    table = calls(args.smoke, args.shapes_extra or args.call == "call4")
    peak = matmul_peak_tflops()
    if peak:
        print(f"RESULT {json.dumps({'matmul_peak_tflops': peak})}", flush=True)
    results = run_call(args.call, table[args.call], args.profile, out_dir)
    from summarize import print_summary

    print_summary(results, peak, out_dir)


if __name__ == "__main__":
    main()
