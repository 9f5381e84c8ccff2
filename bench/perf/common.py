"""Shapes, model folders, random batches and the training step shared by the bench/perf scripts.

Every system trains the same random-init model (saved once to a folder), on the same random tokens, with the same
settings: LoRA r=16 / alpha 16 / dropout 0 on all linear layers of the decoder, bf16 weights, NF4 double-quant
with bf16 compute for QLoRA, gradient checkpointing, bf16 autocast, fused AdamW lr 2e-4 (plain AdamW on the CPU).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    # Llama-3.2-1B and Llama-3.1-8B (tied embeddings only for 1B, as in the released models).
    "1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "qwen7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "gemma9b": dict(
        model_type="gemma2",
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        vocab_size=256000,
        tie_word_embeddings=True,
    ),
    # CPU smoke runs of the scripts only.
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=384,
        tie_word_embeddings=False,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, lora_alpha=16, lora_dropout=0.0)
LR = 2e-4


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_config(shape: str, max_positions: int = 131072, **overrides):
    """The transformers config of ``shape`` (random init follows it), sdpa attention, rope_theta 5e5 for Llama."""
    from transformers import AutoConfig

    fields = dict(SHAPES[shape])
    model_type = fields.pop("model_type")
    fields.update(max_position_embeddings=max_positions, attn_implementation="sdpa")
    if model_type == "llama":
        fields["rope_theta"] = 5e5
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def word_level_tokenizer(vocab_size: int, max_length: int):
    """A tokenizer with one word per id over the whole vocabulary (some loaders check the sizes agree)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"<t{i}>": i for i in range(vocab_size)}, unk_token="<t3>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<t0>", eos_token="<t1>", pad_token="<t2>", unk_token="<t3>"
    )
    fast.model_max_length = max_length
    return fast


def model_folder(shape: str, root: str | os.PathLike, max_positions: int = 131072, **overrides) -> Path:
    """A folder holding the random bf16 model of ``shape`` (seed 0) and a small tokenizer; built once, then reused."""
    tag = f"{shape}-{max_positions}" + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    folder = Path(root) / tag
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    from transformers import AutoModelForCausalLM

    config = make_config(shape, max_positions, **overrides)
    sibling = next(
        (
            f
            for f in Path(root).glob(f"{shape}-*")
            if f.name.split("-", 2)[2:] == tag.split("-", 2)[2:] and any(f.glob("*.safetensors"))
        ),
        None,
    )
    if sibling is not None:
        # Same weights, another max_position_embeddings: link the weights, write the config (no 16 GB rewrite).
        folder.mkdir(parents=True, exist_ok=True)
        for item in sibling.iterdir():
            if item.name != "config.json" and not (folder / item.name).exists():
                (folder / item.name).symlink_to(item.resolve())
        config.save_pretrained(folder)
        return folder
    torch.manual_seed(0)
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="4GB")
    word_level_tokenizer(config.vocab_size, max_positions).save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def nf4_config():
    """The QLoRA quantization every system gets: NF4, double quantization, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def random_batch(vocab_size: int, batch: int, seq: int, seed: int = 1, dev: str | None = None) -> dict:
    """input_ids drawn from a seeded CPU generator (the same on every machine); labels = input_ids."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=gen).to(dev or device())
    return {"input_ids": ids, "labels": ids.clone()}


def optimizer_for(model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR, fused=torch.cuda.is_available())


def time_steps(loss_of, model, optimizer, batch: dict, warmup: int, steps: int, profile: bool = False) -> dict:
    """Run ``warmup + steps`` full optimizer steps; median step time, peak memory, the losses of each step."""
    cuda = torch.cuda.is_available()
    recorder = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        if warmup:  # the warm-up steps (first calls, graph captures) from the allocator's trace: see held_gib below
            from memory_trace import HeldRecorder

            recorder = HeldRecorder()
            recorder.start()
    times, losses = [], []
    host_before = device_before = None
    held_warmup = warmup_allocated = 0
    collections = _GarbageCollections()
    for step in range(warmup + steps):
        if step == warmup:
            if recorder is not None:
                held_warmup = recorder.stop()
                recorder = None
                gc.collect()  # the trace's ~10^5 event dicts: their collection is not the timed steps' to pay
                warmup_allocated = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            host_before = _pinned_pool_growth()
            device_before = _device_pool_events()
            gc.callbacks.append(collections)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
            loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        losses.append(float(loss))
        if step >= warmup:
            times.append(time.perf_counter() - start)
    if recorder is not None:  # no timed step ran
        held_warmup = recorder.stop()
        warmup_allocated = torch.cuda.max_memory_allocated()
    pool = _graph_pool_bytes() if cuda else 0
    allocated = max(torch.cuda.max_memory_allocated(), warmup_allocated) if cuda else 0
    out = {
        "step_s": statistics.median(times) if times else None,
        "step_s_all": [round(t, 4) for t in times],
        # The whole run's most allocated, plus the free blocks of swiftune's layer-graph pool at the end (memory held
        # apart that the allocated count leaves out): an upper bound, which counts twice what a capture allocated
        # from the pool (allocated during the capture, free in the pool after it).
        "peak_gib": round((allocated + pool) / 2**30, 2) if cuda else None,
        # What the run held: tensors plus the pool's reserved memory, event by event over the warm-up steps
        # (memory_trace), and the timed steps' most allocated plus the pool's free blocks (exact there: the pool no
        # longer changes once captured; graph_captures says whether a timed step captured). Without a pool it is
        # the most allocated, as peak_gib.
        "held_gib": round(max(held_warmup, torch.cuda.max_memory_allocated() + pool) / 2**30, 2) if cuda else None,
        "graph_pool_gib": round(pool / 2**30, 3) if cuda else None,
        "losses": [round(x, 5) for x in losses],
        "first_loss": round(losses[0], 5),
    }
    if collections in gc.callbacks:
        gc.callbacks.remove(collections)
    out["gc_timed"] = collections.summary()
    if device_before is not None and (device_after := _device_pool_events()) is not None:
        # cudaMalloc/cudaFree calls and allocator retries during the timed steps (a retry synchronizes the device)
        out["device_pool_timed"] = {k: device_after[k] - device_before[k] for k in device_after}
    if host_before is not None and (after := _pinned_pool_growth()) is not None:
        # pinned blocks the host allocator had to create during the timed steps (each a slow CUDA call)
        out["pinned_allocs_timed"] = after[0] - host_before[0]
        out["pinned_alloc_ms_timed"] = round((after[1] - host_before[1]) / 1e3, 1)
    if profile:
        out["profile"] = profile_step(loss_of, model, optimizer, batch)
    return out


class _GarbageCollections:
    """A gc callback that sums the time of Python's garbage collections by generation (they pause the host)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.ms = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.ms[info["generation"]] += (time.perf_counter() - self.started) * 1e3
            self.count[info["generation"]] += 1

    def summary(self) -> dict:
        return {f"gen{g}": [self.count[g], round(self.ms[g], 1)] for g in range(3)}


def _device_pool_events() -> dict[str, int] | None:
    """Counters of PyTorch's CUDA caching allocator so far: segments created and freed, retries; None on the CPU."""
    if not torch.cuda.is_available():
        return None
    stats = torch.cuda.memory_stats()
    keys = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
    return {key: int(stats.get(key, 0)) for key in keys}


def _pinned_pool_growth() -> tuple[int, float] | None:
    """(blocks created, microseconds spent creating them) by PyTorch's pinned host allocator so far; None when
    this torch cannot say."""
    try:
        stats = torch.cuda.host_memory_stats()
    except (AttributeError, RuntimeError):
        return None
    return int(stats.get("num_host_alloc", 0)), float(stats.get("host_alloc_time.total", 0.0))


def profile_step(loss_of, model, optimizer, batch: dict, top: int = 25) -> str:
    """Two profiled steps: the top-``top`` GPU kernels by device time with their share, then the top operators
    (an operator's device time includes the kernels and copies it launched, so the two lists overlap)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
                loss = loss_of(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines = []
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in kernels) or 1.0
        lines.append(f"GPU kernels, {total / 2e3:.1f} ms a step:")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
            share, ms = 100 * e.self_device_time_total / total, e.self_device_time_total / 2e3
            lines.append(f"  {share:5.1f}%  {ms:8.2f} ms/step  x{e.count // 2:<5d} {e.key[:90]}")
    lines.append(events.table(sort_by=key, row_limit=15, max_name_column_width=60))
    return "\n".join(lines)


def matmul_flops_per_token(config, recompute: bool) -> float:
    """FLOPs per trained token by the 6 * params convention (frozen-base LoRA still costs ~6N: 2N forward, 2N for
    dx, and the adapters' small extra is ignored), + 2N for the recomputed forward under checkpointing. N counts the
    decoder's matmul weights and the lm_head (not the embedding lookup); attention's score matmuls are left out."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter
    n = layers * per_layer + hidden * config.vocab_size
    return (6 + (2 if recompute else 0)) * n - (2 * hidden * config.vocab_size if recompute else 0)


def _graph_pool_bytes() -> int:
    import sys

    graphs = sys.modules.get("swiftune_kernels.layer_graphs")  # only when swiftune ran (never imported for peers)
    return graphs.graph_pool_bytes() if graphs is not None else 0


def emit(result: dict) -> None:
    """One RESULT line (the suite greps these), flushed at once."""
    print("RESULT " + json.dumps(result), flush=True)
