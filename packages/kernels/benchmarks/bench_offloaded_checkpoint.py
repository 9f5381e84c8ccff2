"""Benchmark offloaded vs plain gradient checkpointing on a Llama-8B-shaped decoder stack, batch 1, growing seq.

Modes: ``none`` (no checkpointing), ``torch_checkpoint`` (torch.utils.checkpoint, non-reentrant, for reference),
``recompute`` and ``offload`` (swiftune_kernels.apply_offloaded_checkpointing with that policy). For each sequence
length: peak memory and forward+backward step time. Reported at the end: the crossover (the shortest length from
which offloading costs at most ``--tolerance`` more time than plain recompute, at every longer length measured), the
``OFFLOAD_MIN_ELEMENTS`` it implies, and the longest length each mode reached before OOM or the time budget, with
the length a linear fit of its peak memory projects for OOM. Layers are transformers' LlamaDecoderLayer (sdpa)
when transformers is importable, else a Llama-shaped layer written here. Weights are frozen (LoRA-like) unless
``--trainable``; the stack's input requires grad. ``--qlora`` makes the stack a QLoRA model: every projection an
NF4 bitsandbytes ``Linear4bit`` (double quantization, quantized on the GPU one layer at a time) plus a trainable LoRA
adapter of rank ``--lora-rank``.

``--search`` finds the longest sequence each mode trains instead of timing a list: one step a probe, doubling from
``--search-start`` until out of memory, then bisecting (to ``--search-ratio``) while the time budget lasts; a mode
whose first probe runs out of memory searches downward. Every probe that runs out of memory is recorded as "OOM"
and the search goes on.

    python packages/kernels/benchmarks/bench_offloaded_checkpoint.py                      # GPU, 8 layers
    python packages/kernels/benchmarks/bench_offloaded_checkpoint.py --layers 32 --memory-limit-gib 24
    python packages/kernels/benchmarks/bench_offloaded_checkpoint.py --qlora --layers 32 --memory-limit-gib 24 \
        --search --modes none,recompute,offload --max-seconds 170         # longest seq per mode, < 4 min on an H100
    python packages/kernels/benchmarks/bench_offloaded_checkpoint.py --smoke              # tiny, CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

SEQS = "512,1024,2048,4096,8192,12288,16384,24576,32768,49152,65536,98304,131072,196608,262144"
MODES = "offload,recompute,none,torch_checkpoint"  # the crossover pair first: they get the time budget first


class LlamaShapedLayer(nn.Module):
    """Pre-norm GQA attention + SwiGLU MLP, as LlamaDecoderLayer computes it; used when transformers is absent."""

    def __init__(self, hidden: int, intermediate: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.input_layernorm = nn.RMSNorm(hidden, eps=1e-5)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=1e-5)
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **_):
        b, s, _ = hidden_states.shape
        h = self.input_layernorm(hidden_states)
        q = self.q_proj(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q, k = (
            x * cos + torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), -1) * sin for x in (q, k)
        )
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        hidden_states = hidden_states + self.o_proj(attn.transpose(1, 2).reshape(b, s, -1))
        h = self.post_attention_layernorm(hidden_states)
        return hidden_states + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LoRALinear(nn.Module):
    """A frozen base projection plus a trainable LoRA adapter: ``base(x) + s * (x @ A.T) @ B.T`` (peft's math)."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, rank: int, dtype, device) -> None:
        super().__init__()
        self.base, self.scaling = base, 2.0  # lora_alpha = 2 r
        self.lora_A = nn.Parameter(torch.randn(rank, in_features, device=device, dtype=dtype) / in_features**0.5)
        self.lora_B = nn.Parameter(torch.randn(out_features, rank, device=device, dtype=dtype) * 0.01)

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def to_qlora(layer: nn.Module, rank: int, dtype, device) -> nn.Module:
    """Each projection of ``layer`` becomes NF4 (bitsandbytes, double quantization, on ``device``) + LoRA, in place."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        sys.exit("--qlora needs bitsandbytes (NF4 base weights); install it or drop --qlora.")
    for parent in list(layer.modules()):
        for name in PROJECTIONS:
            linear = getattr(parent, name, None)
            if not isinstance(linear, nn.Linear):
                continue
            quantized = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=False, compute_dtype=dtype, quant_type="nf4",
                compress_statistics=True, device="meta",
            )  # fmt: skip
            weight = linear.weight.data.to(device, dtype)
            quantized.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, quant_type="nf4", compress_statistics=True, module=quantized
            )._quantize(device)
            del weight
            adapter = LoRALinear(quantized, linear.in_features, linear.out_features, rank, dtype, device)
            setattr(parent, name, adapter)
    return layer


def build_stack(args, device, dtype):
    """(layers, rotary(x, position_ids) -> (cos, sin), kind); each layer built (and quantized), one at a time."""
    dims = dict(hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads)
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        config = LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            num_hidden_layers=args.layers,
            max_position_embeddings=max(args.seq_list),
            rms_norm_eps=1e-5,
        )
        config._attn_implementation = "sdpa"  # eager attention would materialise seq x seq scores
        with torch.device(device):
            rotary = LlamaRotaryEmbedding(config=config)
        make, kind = (lambda i: LlamaDecoderLayer(config, i)), "transformers.LlamaDecoderLayer"
        head_dim = None
    except ImportError:
        make, kind = (lambda i: LlamaShapedLayer(**dims)), "LlamaShapedLayer (transformers not importable)"
        head_dim = args.hidden // args.heads
    layers = nn.ModuleList()
    for i in range(args.layers):
        with torch.device(device):
            layer = make(i).to(dtype)
        if args.qlora:
            layer = to_qlora(layer, args.lora_rank, dtype, device)
        layers.append(layer)
    if args.qlora:
        kind += f", NF4 (bitsandbytes) + LoRA r={args.lora_rank}"
    if head_dim is None:
        return layers, rotary, kind
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))

    def rotary_fn(x, position_ids):
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), -1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    return layers, rotary_fn, kind


def make_step(layers, mode, x, dy, position_ids, position_embeddings):
    def step():
        x.grad = None
        h = x
        for layer in layers:
            kwargs = dict(attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
            if mode == "torch_checkpoint":
                out = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False, **kwargs)
            else:
                out = layer(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
        torch.autograd.backward(h, dy)

    return step


def step_flops(args, seq: int) -> float:
    """Model FLOPs of one step, recompute not counted (so checkpointing shows as lower TFLOP/s).

    Forward per layer: 2 x tokens x weights, plus causal attention 2 x seq^2 x hidden (QK^T and PV, each
    2 x seq^2 x hidden, halved by the mask). Backward: the input gradient costs the forward again for the matmuls
    and twice for attention; trainable weights add the forward's matmuls once more.
    """
    kv = args.hidden // args.heads * args.kv_heads
    weights = args.hidden * (2 * args.hidden + 2 * kv) + 3 * args.hidden * args.intermediate
    matmul, attention = 2 * seq * weights, 2 * seq * seq * args.hidden
    backward = matmul * (2 if args.trainable else 1) + 2 * attention
    return args.layers * (matmul + attention + backward)


def copy_bandwidths(device, on_gpu: bool) -> dict:
    """GB/s of a device copy (read + write counted) and of pinned host<->device copies: the ceilings here."""
    if not on_gpu:
        return {}
    numel = 1 << 28  # 512 MiB of bf16
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    host = torch.empty(numel, dtype=torch.bfloat16, pin_memory=True)
    result = {}
    for name, fn, factor in (
        ("device_copy_gbps", lambda: dst.copy_(src), 2),
        ("d2h_pinned_gbps", lambda: host.copy_(src, non_blocking=True), 1),
        ("h2d_pinned_gbps", lambda: dst.copy_(host, non_blocking=True), 1),
    ):
        ms = time_ms(fn, True, reps=5)
        result[name] = round(factor * numel * 2 / ms / 1e6, 1)
    return result


def time_ms(fn, on_gpu: bool, reps: int) -> float:
    times = []
    for _ in range(reps):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if on_gpu:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(args, layers, rotary, mode, seq, device, on_gpu, reps):
    """One (mode, seq) row: step time (after one warm-up step; of that one step if ``reps`` is 0) and peak memory
    above the resident state."""
    from swiftune_kernels import apply_offloaded_checkpointing

    if seq >= args.fake_oom.get(mode, float("inf")):  # --fake-oom: the OOM path, testable without a GPU
        raise torch.cuda.OutOfMemoryError(f"--fake-oom: {mode} at {seq} tokens")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    gen = torch.Generator(device=device).manual_seed(seq)
    x = torch.randn(1, seq, args.hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(1, seq, args.hidden, device=device, dtype=dtype, generator=gen)
    position_ids = torch.arange(seq, device=device)[None]
    position_embeddings = rotary(x, position_ids)
    handle = None
    if mode in ("recompute", "offload"):
        handle = apply_offloaded_checkpointing(layers, policy=mode)
    try:
        step = make_step(layers, mode, x, dy, position_ids, position_embeddings)
        if on_gpu:
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        begin = time.perf_counter()
        step()  # warm-up, and the peak
        peak = None
        if on_gpu:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        ms = time_ms(step, on_gpu, reps) if reps else (time.perf_counter() - begin) * 1e3
    finally:
        if handle is not None:
            handle.revert()
    row = {
        "op": "offloaded_checkpoint",
        "provider": mode,
        "shape": f"1x{seq}x{args.hidden}",
        "layers": args.layers,
        "weight": ("qlora" if args.qlora else "trainable" if args.trainable else "frozen"),
        "seq": seq,
        "ms": round(ms, 3),
        "tokens_per_s": round(seq / ms * 1e3, 1),
        "tflops": round(step_flops(args, seq) / ms / 1e9, 1),
    }
    if peak is not None:
        row["peak_gib"] = round(peak / 2**30, 3)
        row["extra_peak_mib"] = round((peak - resident) / 2**20, 1)
    return row


def free_memory(on_gpu: bool) -> None:
    gc.collect()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):  # pinned blocks of the last length are not reused by the next
            torch._C._host_emptyCache()


def is_oom(error: BaseException) -> bool:
    # cuBLAS reports OOM as CUBLAS_STATUS_ALLOC_FAILED (a RuntimeError); some allocations say "out of memory"
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or "ALLOC_FAILED" in text or "out of memory" in text


def guarded(args, layers, rotary, mode, seq, device, on_gpu, reps) -> dict:
    """measure(), with an out-of-memory (or any other failure) turned into a row instead of an exception."""
    try:
        return measure(args, layers, rotary, mode, seq, device, on_gpu, reps)
    except Exception as error:
        oom = is_oom(error)
        row = {"op": "offloaded_checkpoint", "provider": mode, "seq": seq, "oom": oom}
        if oom:
            row["result"] = "OOM"
        else:
            row["error"] = repr(error)[:300]
        return row
    finally:
        free_memory(on_gpu)


def search_longest(args, layers, rotary, device, on_gpu, deadline) -> tuple[list[dict], dict]:
    """Per mode, the longest sequence one training step fits in memory: (probe rows, {mode: result})."""
    rows, results = [], {}
    for i, mode in enumerate(args.mode_list):
        # an even share of what is left: a mode that finishes early (e.g. "none" runs out of memory at once) leaves
        # its time to the next ones
        mode_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (len(args.mode_list) - i)
        ok = bad = last = None  # longest length that ran, shortest that ran out of memory, (seq, ms) of the last run
        seq, stop = args.search_start, "converged"
        while True:
            if bad is None and seq > args.search_max:
                stop = "--search-max"
                break
            if bad is not None:
                if ok is None:  # even the first length ran out of memory: search downward
                    seq = bad // 2 // args.search_step * args.search_step
                    if seq < args.search_step:
                        stop = f"OOM at {bad}"
                        break
                elif bad / ok <= args.search_ratio:
                    break
                else:
                    seq = (ok + bad) // 2 // args.search_step * args.search_step
                    if seq <= ok:
                        break
            # attention makes a step grow up to quadratically with the length
            predicted_s = 0.0 if last is None else last[1] / 1e3 * (seq / last[0]) ** 2
            if time.perf_counter() + predicted_s > mode_deadline:
                stop = "time budget"
                break
            row = guarded(args, layers, rotary, mode, seq, device, on_gpu, reps=0)
            row["search"] = True
            print("RESULT " + json.dumps(row), flush=True)
            rows.append(row)
            if "ms" in row:
                ok, last = seq, (seq, row["ms"])
                if bad is None:
                    seq *= 2
            elif row.get("oom"):
                bad = seq
            else:
                stop = "error"
                break
        results[mode] = {"longest_ok": ok, "shortest_oom": bad, "stopped_by": stop}
    return rows, results


def summarize(args, rows, stops, capacity_gib):
    """Crossover, the minimum size it implies, and per mode the longest length reached and projected."""
    by = {(r["provider"], r["seq"]): r for r in rows if "ms" in r}
    both = sorted(s for (m, s) in by if m == "offload" and ("recompute", s) in by)
    overhead = {s: by[("offload", s)]["ms"] / by[("recompute", s)]["ms"] - 1 for s in both}
    crossover = None
    for s in reversed(both):  # the shortest length from which offloading stays within the tolerance
        if overhead[s] > args.tolerance:
            break
        crossover = s
    summary = {
        "summary": "offloaded_checkpoint",
        "overhead_vs_recompute": {str(s): round(v, 4) for s, v in overhead.items()},
        "crossover_seq": crossover,
        "recommended_min_elements": None if crossover is None else crossover * args.hidden,
        "tolerance": args.tolerance,
        "modes": {},
    }
    for mode in args.mode_list:
        ok = sorted(s for (m, s) in by if m == mode)
        entry = {"longest_seq": ok[-1] if ok else None, "stopped_by": stops.get(mode, "end of --seqs")}
        peaks = [(s, by[(mode, s)].get("peak_gib")) for s in ok if by[(mode, s)].get("peak_gib") is not None]
        if len(peaks) >= 2 and capacity_gib:
            (s1, p1), (s2, p2) = peaks[-2], peaks[-1]
            per_token = (p2 - p1) / (s2 - s1)
            entry["peak_gib_per_1k_tokens"] = round(per_token * 1024, 4)
            if per_token > 0:
                entry["projected_oom_seq"] = int(s2 + (capacity_gib - p2) / per_token)
        summary["modes"][mode] = entry
    return summary


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--seqs", default=SEQS, help="comma-separated sequence lengths, ascending")
    parser.add_argument("--modes", default=MODES)
    parser.add_argument("--trainable", action="store_true", help="train the layers' weights (default: frozen)")
    parser.add_argument("--qlora", action="store_true", help="NF4 base weights (bitsandbytes) + trainable LoRA")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--search", action="store_true", help="find the longest sequence per mode (one step a probe)")
    parser.add_argument("--search-start", type=int, default=4096, help="first length a mode tries")
    parser.add_argument("--search-max", type=int, default=1 << 20, help="longest length tried")
    parser.add_argument("--search-ratio", type=float, default=1.125, help="stop when shortest OOM / longest ok <= this")
    parser.add_argument("--search-step", type=int, default=512, help="lengths probed are multiples of this")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time budget for all measurements")
    parser.add_argument("--memory-limit-gib", type=float, default=None, help="cap the GPU memory (a smaller card)")
    parser.add_argument("--tolerance", type=float, default=0.03, help="offload overhead accepted for the crossover")
    parser.add_argument("--fake-oom", default="", help="MODE:TOKENS,...: raise OOM from that length on (tests)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 3, 64, 128, 4, 2
        args.seqs, args.lora_rank = "16,48", min(args.lora_rank, 4)
        args.search_start, args.search_max, args.search_step = 16, min(args.search_max, 256), 8
        torch.set_num_threads(1)  # tiny matmuls: threads only add contention
    args.seq_list = [int(s) for s in args.seqs.split(",")]
    args.mode_list = args.modes.split(",")
    args.fake_oom = {m: int(n) for m, n in (item.split(":") for item in args.fake_oom.split(",") if item)}
    return args


def print_table(rows, kind, args, info, bandwidths) -> None:
    print(f"\n{kind}, {args.layers} layers, hidden {args.hidden}, {info['device']}, bandwidths {bandwidths}")
    print(f"{'seq':>7} {'mode':<17} {'ms':>10} {'tok/s':>10} {'TFLOP/s':>8} {'peak GiB':>9}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['seq']:>7} {r['provider']:<17} {'OOM' if r['oom'] else r['error'][:60]}")
            continue
        peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        cells = f"{r['ms']:>10.1f} {r['tokens_per_s']:>10.0f} {r['tflops']:>8.1f} {peak:>9}"
        print(f"{r['seq']:>7} {r['provider']:<17} {cells}")


def main() -> None:
    args = parse_args()
    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu and not args.smoke:
        sys.exit("bench_offloaded_checkpoint.py needs a CUDA GPU; use --smoke for a CPU check.")
    # An explicit index: set_per_process_memory_fraction refuses a bare "cuda".
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    start = time.perf_counter()

    bandwidths = copy_bandwidths(device, on_gpu)
    if bandwidths:
        print("RESULT " + json.dumps(bandwidths), flush=True)
    free_memory(on_gpu)  # the cached copy buffers would count against --memory-limit-gib
    capacity_gib = None
    if on_gpu:
        total = torch.cuda.get_device_properties(device).total_memory
        if args.memory_limit_gib:  # before building: the model has to fit the smaller card too
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gib * 2**30 / total), device)
        capacity_gib = args.memory_limit_gib or total / 2**30
    args.seq_list.append(args.search_max if args.search else args.seq_list[-1])  # rotary tables' max position
    layers, rotary, kind = build_stack(args, device, torch.bfloat16 if on_gpu else torch.float32)
    args.seq_list.pop()
    layers.requires_grad_(args.trainable and not args.qlora)
    for name, param in layers.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
    info = {"layer": kind, "layers": args.layers, "device": torch.cuda.get_device_name(device) if on_gpu else "cpu"}
    info.update(memory_limit_gib=capacity_gib, build_s=round(time.perf_counter() - start, 1))
    if on_gpu:
        info["resident_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
    print("RESULT " + json.dumps(info), flush=True)
    # Untimed: cuBLAS handles, sdpa kernel choice, the side streams. A length too long for the card is no crash.
    warm_seq = min(args.seq_list[0], args.search_start) if args.search else args.seq_list[0]
    for mode in ("none", "offload"):
        row = guarded(args, layers, rotary, mode, warm_seq, device, on_gpu, reps=1)
        if "ms" not in row:
            print("RESULT " + json.dumps({**row, "warm_up": True}), flush=True)

    if args.search:
        rows, results = search_longest(args, layers, rotary, device, on_gpu, start + args.max_seconds)
        summary = {"summary": "longest_seq", "layer": kind, "layers": args.layers, "memory_limit_gib": capacity_gib}
        summary.update(modes=results, seconds=round(time.perf_counter() - start, 1))
        print("RESULT " + json.dumps(summary), flush=True)
        print_table(rows, kind, args, info, bandwidths)
        for mode, entry in results.items():
            print(f"{mode:<17} longest that trains: {entry['longest_ok']}, shortest OOM: {entry['shortest_oom']} "
                  f"({entry['stopped_by']})")  # fmt: skip
        return

    rows, stops, last = [], {}, {}
    for seq in args.seq_list:
        for mode in args.mode_list:
            if mode in stops:
                continue
            step_s = None
            if mode in last:  # attention makes a step grow up to quadratically with the length
                prev_seq, prev_ms = last[mode]
                step_s = prev_ms / 1e3 * (seq / prev_seq) ** 2
            reps = 1 if args.smoke or (step_s is not None and step_s > 1.0) else 3
            if step_s is not None and time.perf_counter() - start + step_s * (1 + reps) > args.max_seconds:
                stops[mode] = "time budget"
                continue
            row = guarded(args, layers, rotary, mode, seq, device, on_gpu, reps)
            if "ms" in row:
                last[mode] = (seq, row["ms"])
            else:
                stops[mode] = f"{'OOM' if row['oom'] else 'error'} at {seq}"
            print("RESULT " + json.dumps(row), flush=True)
            rows.append(row)
    summary = summarize(args, rows, stops, capacity_gib)
    print("RESULT " + json.dumps(summary), flush=True)
    print_table(rows, kind, args, info, bandwidths)
    print(f"crossover (offload within {args.tolerance:.0%} of recompute from): {summary['crossover_seq']}")
    print(f"recommended OFFLOAD_MIN_ELEMENTS: {summary['recommended_min_elements']}")
    for mode, entry in summary["modes"].items():
        print(f"{mode:<17} {entry}")


if __name__ == "__main__":
    main()
