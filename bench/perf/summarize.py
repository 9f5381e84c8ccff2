"""The table printed last by the suite: tokens/s, peak memory, ratios, MFU, first losses; the loss-curve plot.

python bench/perf/summarize.py /tmp/out/*.jsonl     # the table again from saved results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# 6 * N * tokens/s over the measured bf16 matmul peak: model FLOPs (the recomputed forward is not credited, so
# checkpointing costs MFU), N = the decoder's matmul weights + lm_head; attention's score matmuls left out.
MFU_CONVENTION = "6*N*tokens/s (no recompute credit) / measured bf16 matmul peak"


def label(r: dict) -> str:
    """The system, with swiftune's checkpointing override and the recompute-skip switch when a run set them."""
    text = r["system"]
    if "checkpointing" in r:
        text += f" ckpt={r['checkpointing']}"
    if r.get("recompute_skip") is False:
        text += " no-skip"
    if r.get("park"):
        text += f" park={r['park']}"
    if r.get("graphs"):
        text += " graphs"
    if r.get("offload_embeddings"):
        text += " emb-host"
    return text


def print_summary(results: list[dict], peak_tflops: float | None, out_dir: Path | None = None) -> None:
    throughput = [r for r in results if r.get("tokens_per_s")]
    groups: dict[tuple, list[dict]] = {}
    for r in throughput:
        groups.setdefault((r["shape"], r["quant"], r["batch"], r["seq"]), []).append(r)
    for (shape, quant, batch, seq), rows in groups.items():
        by = {label(r): r for r in rows}
        peft = by.get("peft-bf16") if quant == "bf16" and "peft-bf16" in by else by.get("peft")
        unsloth = by.get("unsloth")
        print(f"\n{shape} {'QLoRA nf4' if quant == 'nf4' else 'LoRA bf16'}, batch {batch} x {seq}")
        print(
            f"{'system':<26}{'tokens/s':>10}{'peak GiB':>10}{'held GiB':>10}{'x peft':>8}{'x unsloth':>10}"
            f"{'MFU':>7}{'loss0':>9}  modes"
        )
        for r in rows:
            ratio_p = f"{r['tokens_per_s'] / peft['tokens_per_s']:.2f}" if peft else "-"
            ratio_u = f"{r['tokens_per_s'] / unsloth['tokens_per_s']:.2f}" if unsloth else "-"
            mfu = f"{r['model_tflops'] / peak_tflops:.0%}" if peak_tflops else "-"
            modes = r.get("checkpoint_modes", "")
            print(
                f"{label(r):<26}{r['tokens_per_s']:>10.0f}{str(r.get('peak_gib')):>10}{str(r.get('held_gib')):>10}{ratio_p:>8}{ratio_u:>10}"
                f"{mfu:>7}{r['first_loss']:>9.4f}  {modes or ''}"
            )
        losses = [r["first_loss"] for r in rows]
        spread = max(losses) - min(losses)
        print(
            f"first-step loss spread {spread:.4f} ({'agree' if spread < 0.02 else 'DISAGREE'}); MFU = {MFU_CONVENTION};"
            " peak: most allocated + graph pool (an upper bound); held: the same event by event (memory_trace)"
        )
    for r in results:
        if "skipped" in r or "error" in r or "timeout_s" in r or r.get("oom"):
            print(f"{r['system']} {r['shape']} {r['quant']}: " + str(r.get("skipped") or r.get("error") or r))
    ctx = [r for r in results if "ctx_longest" in r]
    for r in ctx:
        fits = [x for x in results if x.get("fits") and x["system"] == r["system"]]
        peak = max((x["peak_gib"] or 0 for x in fits if x["ctx"] == r["ctx_longest"]), default=None)
        print(
            f"\nlongest {r['shape']} {r['quant']} batch-1 sequence, {r['system']}: {r['ctx_longest']:,} tokens "
            f"(peak {peak} GiB); first out of memory: {r['ctx_first_oom']}"
        )
    curves = {r["system"]: r["curve"] for r in results if "curve" in r}
    if len(curves) >= 2:
        names = list(curves)
        a, b = curves[names[0]], curves[names[1]]
        gaps = [abs(x - y) for x, y in zip(a, b, strict=False)]
        print(
            f"\nloss curves ({len(a)} steps): {names[0]} {a[0]:.4f} -> {a[-1]:.4f}, "
            f"{names[1]} {b[0]:.4f} -> {b[-1]:.4f}; "
            f"largest gap {max(gaps):.4f}, mean gap {sum(gaps) / len(gaps):.4f}"
        )
        if out_dir is not None:
            plot_curves(curves, out_dir / "loss_curve.png")


def plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        print(f"no plot ({error})")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("same seed and data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    rows = [json.loads(line) for name in sys.argv[1:] for line in Path(name).read_text().splitlines() if line]
    peak = next((r["matmul_peak_tflops"] for r in rows if "matmul_peak_tflops" in r), None)
    print_summary(rows, peak)
