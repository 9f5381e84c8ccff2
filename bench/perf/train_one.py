"""One system, one process: build it on the saved random model, time training steps, print RESULT lines.

Systems (identical settings, see common.py): ``peft`` (transformers + peft, fp32 adapters as peft makes them),
``peft-bf16`` (bf16 adapters), ``liger`` / ``liger-bf16`` (+ Liger-Kernel's patches: RoPE, RMSNorm, SwiGLU, fused
linear cross-entropy), ``unsloth`` (its FastLanguageModel, "unsloth" checkpointing), ``swiftune`` (public API,
default checkpointing) and ``swiftune-auto`` (public API, memory-aware checkpointing "auto").

    python bench/perf/train_one.py --system swiftune --shape 8b --quant nf4 --batch 2 --seq 2048
    python bench/perf/train_one.py --system swiftune --shape 8b --quant nf4 --ctx 131072,262144,524288 --time-limit 480
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

T0 = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parent))

SYSTEMS = ("peft", "peft-bf16", "liger", "liger-bf16", "unsloth", "swiftune", "swiftune-auto", "swiftune-true")


def build(system: str, folder: Path, quant: bool, max_seq: int):
    """(model, loss_of(model, batch)) for ``system``; raises ImportError with a reason when it is not installed."""
    import torch

    if system == "unsloth":
        from common import LORA, TARGETS
        from unsloth import FastLanguageModel as Unsloth  # must come before transformers / peft

        model, _ = Unsloth.from_pretrained(
            model_name=str(folder),
            max_seq_length=max_seq,
            dtype=torch.bfloat16,
            load_in_4bit=quant,
            local_files_only=True,
            **({"offload_embedding": True} if CHECKPOINTING.get("offload_embeddings") else {}),
        )
        model = Unsloth.get_peft_model(
            model,
            **LORA,
            bias="none",
            target_modules=TARGETS,
            use_gradient_checkpointing="unsloth",
            random_state=3407,
            max_seq_length=max_seq,
        )
        model.train()
        return model, lambda m, b: m(**b).loss
    if system.startswith("swiftune"):
        return _build_swiftune(system, folder, quant, max_seq, CHECKPOINTING.get("mode"))
    return _build_peft(system, folder, quant)


# --checkpointing / --no-recompute-skip, set by main() before build(): swiftune's mode overridden for one run.
CHECKPOINTING: dict = {}


def _park_projections(text: str) -> tuple[str, ...]:
    """--park: "gate,up", "gate" or "up" (empty: park nothing, the library default)."""
    names = tuple(name for name in text.split(",") if name)
    unknown = set(names) - {"gate", "up"}
    if unknown:
        raise SystemExit(f"--park takes gate and/or up, got {sorted(unknown)}")
    return names


def _checkpoint_mode(text: str | None):
    """--checkpointing: "auto", True ("true"), "offload", or a number (GiB budget of the memory-aware mode)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return {"true": True, "auto": "auto", "offload": "offload"}[text]


def _build_swiftune(system: str, folder: Path, quant: bool, max_seq: int, override=None):
    import torch
    from common import LORA, TARGETS, device

    from swiftune_loader import FastLanguageModel
    from swiftune_loader.patching import fused_causal_lm_loss

    mode = {"swiftune": None, "swiftune-auto": "auto", "swiftune-true": True}[system]
    if override is not None:
        mode = override
    options = {} if mode is None else {"use_gradient_checkpointing": mode}
    model, _ = FastLanguageModel.from_pretrained(
        str(folder),
        max_seq_length=max_seq,
        load_in_4bit=quant,
        dtype=torch.bfloat16,
        device_map={"": 0} if device() == "cuda" else "cpu",
        fix_tokenizer=False,
        fast_path=True,
        **options,
    )
    # The library's options (FastLanguageModel.get_peft_model): the frozen input embedding's table in host memory;
    # checkpointed layers replayed from CUDA graphs; offloaded layers parking MLP intermediates for the recompute.
    if CHECKPOINTING.get("offload_embeddings"):
        options["offload_embeddings"] = True
    if CHECKPOINTING.get("graphs"):
        options["cuda_graphs"] = True
    if CHECKPOINTING.get("park"):
        options["park_intermediates"] = True
        # which projections (the library's: gate and up without graphs, gate with them): for A/B runs only
        importlib.import_module("swiftune_kernels.lora_mlp").PARKED_PROJECTIONS = CHECKPOINTING["park"]
        importlib.import_module("swiftune_kernels.slot_parking").SLOT_PARKED = CHECKPOINTING["park"]
    model = FastLanguageModel.get_peft_model(model, **LORA, target_modules=TARGETS, **options)
    if CHECKPOINTING.get("no_skip"):  # A/B: recompute the MLP's down projection as before
        for module in model.modules():
            if hasattr(module, "_swiftune_output_to_residual"):
                module._swiftune_output_to_residual = False
    model.train()
    return model, lambda m, b: fused_causal_lm_loss(m, b)


def _build_peft(system: str, folder: Path, quant: bool):
    import torch
    from common import LORA, TARGETS, device, nf4_config
    from transformers import AutoConfig, AutoModelForCausalLM

    if system.startswith("liger"):
        import liger_kernel.transformers as liger

        model_type = AutoConfig.from_pretrained(folder).model_type
        getattr(liger, f"apply_liger_kernel_to_{model_type}")(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
        )
    q = nf4_config() if quant else None
    model = AutoModelForCausalLM.from_pretrained(
        str(folder),
        dtype=torch.bfloat16,
        quantization_config=q,
        attn_implementation="sdpa",
        device_map={"": 0} if device() == "cuda" else "cpu",
    )
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**LORA, bias="none", target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config, autocast_adapter_dtype=not system.endswith("-bf16"))
    model.train()  # transformers checkpoints only in training mode
    return model, lambda m, b: m(**b).loss


def measure(args, model, loss_of, config) -> None:
    import torch
    from common import emit, matmul_flops_per_token, optimizer_for, random_batch, time_steps

    optimizer = optimizer_for(model)
    base = {"system": args.system, "shape": args.shape, "quant": args.quant, "device": _device_name()}
    if args.checkpointing is not None:
        base["checkpointing"] = args.checkpointing
    if args.no_recompute_skip:
        base["recompute_skip"] = False
    if args.no_cudnn_attention:
        base["cudnn_attention"] = False
    if args.park:
        base["park"] = args.park
    if args.graphs:
        base["graphs"] = True
    if args.offload_embeddings:
        base["offload_embeddings"] = True
    for point in [p for p in args.points.split(",") if p and not args.curve]:
        batch_size, seq = (int(v) for v in point.split("x"))
        batch = random_batch(config.vocab_size, batch_size, seq)
        try:
            out = time_steps(loss_of, model, optimizer, batch, args.warmup, args.steps, profile=args.profile)
        except torch.OutOfMemoryError:
            emit({**base, "batch": batch_size, "seq": seq, "oom": True})
            _free()
            continue
        tokens_per_s = batch_size * seq / out["step_s"] if out["step_s"] else None
        flops = matmul_flops_per_token(config, recompute=False)  # model FLOPs: recompute is not credited
        result = {**base, "batch": batch_size, "seq": seq, "tokens_per_s": round(tokens_per_s or 0, 1)}
        result.update(
            step_s=out["step_s"], peak_gib=out["peak_gib"], held_gib=out["held_gib"], first_loss=out["first_loss"]
        )
        result["losses"] = out["losses"]
        if args.graphs:  # graphs captured and replays run, over all layers (the warm-up steps included)
            wrappers = [getattr(m.__dict__.get("forward"), "graphs", None) for m in model.modules()]
            result["graph_captures"] = sum(g.captures for g in wrappers if g is not None)
            result["graph_replays"] = sum(g.replays for g in wrappers if g is not None)
        keys = ("step_s_all", "pinned_allocs_timed", "pinned_alloc_ms_timed", "gc_timed", "device_pool_timed")
        for key in (*keys, "graph_pool_gib"):
            if key in out:
                result[key] = out[key]
        if torch.cuda.is_available():
            from link_bandwidth import link_gbs

            result.update(link_gbs())
        result["model_tflops"] = round(flops * (tokens_per_s or 0) / 1e12, 2)
        modes = getattr(getattr(_inner(model), "_swiftune_offload", None), "modes", None)
        if modes is not None:
            result["checkpoint_modes"] = {m: modes.count(m) for m in sorted(set(modes))}
        emit(result)
        if args.profile and "profile" in out:
            print(f"top kernels, {args.system} {point}:\n{out['profile']}", flush=True)
    if args.curve:
        loss_curve(args, model, loss_of, optimizer, config, base)
    if args.ctx:
        probe_context(args, model, loss_of, optimizer, config, base)


def loss_curve(args, model, loss_of, optimizer, config, base) -> None:
    """--curve steps, a new batch each step (seeded by the step: every system sees the same data)."""
    from common import emit, random_batch, time_steps

    batch_size, seq = (int(v) for v in (args.curve_point or args.points).split(",")[0].split("x"))
    losses = []
    for step in range(args.curve):
        out = time_steps(
            loss_of, model, optimizer, random_batch(config.vocab_size, batch_size, seq, seed=100 + step), 0, 1
        )
        losses.append(out["first_loss"])
    emit({**base, "batch": batch_size, "seq": seq, "curve": losses})


def probe_context(args, model, loss_of, optimizer, config, base) -> None:
    """Longest batch-1 sequence that trains (one step): doubling through --ctx, then bisection to 8k resolution,
    each attempt skipped when its predicted time (quadratic in length from the last fit) passes --time-limit."""
    import torch
    from common import emit, random_batch, time_steps

    fits, fails, last = [], [], None
    candidates = [int(v) for v in args.ctx.split(",") if v]

    def attempt(seq: int) -> bool | None:
        nonlocal last
        if last is not None:
            predicted = last[1] * (seq / last[0]) ** 2 + 5
            if time.time() - T0 + predicted > args.time_limit:
                return None
        start = time.time()
        try:
            out = time_steps(loss_of, model, optimizer, random_batch(config.vocab_size, 1, seq), 0, 1)
            ok = True
            emit(
                {
                    **base,
                    "ctx": seq,
                    "fits": True,
                    "peak_gib": out["peak_gib"],
                    "held_gib": out["held_gib"],
                    "wall_s": round(time.time() - start, 1),
                }
            )
            last = (seq, time.time() - start)
        except torch.OutOfMemoryError:
            ok = False
            emit({**base, "ctx": seq, "fits": False})
        _free()
        return ok

    def walk(lengths: list[int]) -> None:
        # In order, stopping at the first that does not fit (or that the time guard skips).
        for seq in lengths:
            ok = attempt(seq)
            if ok is None:
                return
            if ok:
                fits.append(seq)
            else:
                fails.insert(0, seq)
                return

    walk(candidates)
    if not fits:  # even the first length failed: climb from below instead
        walk([int(v) for v in args.ctx_down.split(",") if v])
    fits.sort()
    fails.sort()
    while fits and fails and fails[0] - fits[-1] > 8192:
        mid = (fits[-1] + fails[0]) // 2 // 8192 * 8192
        ok = attempt(mid)
        if ok is None:
            break
        if ok:
            fits.append(mid)
        else:
            fails.insert(0, mid)
    emit({**base, "ctx_longest": max(fits) if fits else 0, "ctx_first_oom": fails[0] if fails else None})


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--quant", choices=("bf16", "nf4"), default="bf16")
    parser.add_argument("--points", default="8x2048", help="comma-separated BATCHxSEQ")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--folder", default=os.environ.get("SWIFTUNE_BENCH_MODELS", "/tmp/swiftune-bench-models"))
    parser.add_argument("--max-positions", type=int, default=131072)
    parser.add_argument("--ctx", default="", help="batch-1 lengths to try in order (then bisect)")
    parser.add_argument("--ctx-down", default="", help="when the first --ctx length fails: these, ascending")
    parser.add_argument("--curve", type=int, default=0, help="steps of a loss curve on fresh seeded batches")
    parser.add_argument("--curve-point", default="", help="BATCHxSEQ of the curve (default: the first --points)")
    parser.add_argument("--time-limit", type=float, default=480.0, help="seconds since start, for --ctx")
    parser.add_argument("--profile", action="store_true", help="print the top-15 kernels by device time")
    parser.add_argument("--checkpointing", default=None, help="swiftune: auto, true, offload or a GiB budget")
    parser.add_argument("--no-recompute-skip", action="store_true", help="swiftune: recompute the down projection")
    parser.add_argument("--park", default="", help="swiftune: park these MLP projections for the recompute (gate,up)")
    parser.add_argument("--graphs", action="store_true", help="swiftune: checkpointed layers from CUDA graphs")
    parser.add_argument(
        "--offload-embeddings", action="store_true", help="swiftune and unsloth: the input embedding in host memory"
    )
    parser.add_argument(
        "--no-cudnn-attention", action="store_true", help="turn PyTorch's cuDNN attention off (sdpa then uses flash)"
    )
    args = parser.parse_args()
    CHECKPOINTING.update(
        mode=_checkpoint_mode(args.checkpointing),
        no_skip=args.no_recompute_skip,
        park=_park_projections(args.park),
        graphs=args.graphs,
        offload_embeddings=args.offload_embeddings,
    )
    if args.no_cudnn_attention:  # A/B: cuDNN attention costs ~100 us of host time a call where the host bounds a step
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)
    from common import emit, model_folder

    base = {"system": args.system, "shape": args.shape, "quant": args.quant}
    try:
        folder = model_folder(args.shape, args.folder, max_positions=args.max_positions)
        start = time.time()
        model, loss_of = build(args.system, folder, args.quant == "nf4", args.max_positions)
        print(f"built {args.system} in {time.time() - start:.1f}s (process {time.time() - T0:.1f}s)", flush=True)
    except ImportError as error:
        emit({**base, "skipped": f"{type(error).__name__}: {error}"[:300]})
        return
    except Exception as error:  # one system failing must not stop the suite: report it and go on
        traceback.print_exc()
        emit({**base, "error": f"{type(error).__name__}: {error}"[:500]})
        return
    measure(args, model, loss_of, _inner(model).config)


if __name__ == "__main__":
    main()
