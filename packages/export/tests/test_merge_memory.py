"""Peak memory of the streamed merge, measured: near one input shard + one output shard + one layer's tensors,
not the model.

The merge runs in a child process, which reports its resident memory after its imports (and a first matmul, which
sets up BLAS buffers once) and its peak after the merge (VmHWM, the high-water mark of this process image; not
ru_maxrss, which keeps the pre-exec peak of the forked test process); the difference is what the merge added.
Expected at most: the input shard being read (safetensors maps the file; the pages read stay resident while a tensor
of it is alive), the output shard being filled, and a few float32 copies of the largest tensor (the weight in
float32, B @ A, their sum before the cast back): two shards and four tensors, plus 8 MiB of slack for the allocator
and the page faults that map neighbouring pages. A merge that held the model would need the model's size.
"""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

LAYERS, ROWS, COLUMNS = 8, 1024, 1024  # 4 weights of 4 MiB (float32) per layer: 16 MiB a layer, 128 MiB in all
MiB = 1024**2


def _sharded_base(folder):
    """One safetensors shard per layer, with an index, as large models are stored."""
    folder.mkdir()
    weight_map = {}
    for layer in range(LAYERS):
        shard = f"model-{layer + 1:05d}-of-{LAYERS:05d}.safetensors"
        tensors = {
            f"model.layers.{layer}.{name}.weight": torch.randn(ROWS, COLUMNS)
            for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.gate_proj")
        }
        save_file(tensors, str(folder / shard))
        weight_map.update(dict.fromkeys(tensors, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def _adapter(folder, base):
    folder.mkdir()
    tensors = {}
    for layer in range(LAYERS):
        module = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{module}.lora_A.weight"] = torch.randn(8, COLUMNS)
        tensors[f"{module}.lora_B.weight"] = torch.randn(ROWS, 8)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": str(base)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


CHILD = """
import sys
import torch
from swiftune_export import merge_adapter

def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key + ":"))

# Warm up what the first merge would set up once (BLAS thread buffers), so that it is not counted as the merge's.
torch.randn(1024, 8) @ torch.randn(8, 1024)
before = status("VmRSS")
merge_adapter(sys.argv[1], sys.argv[2], max_shard_bytes=int(sys.argv[3]))
print(before, status("VmHWM"))
"""


def test_streamed_merge_peak_memory_is_near_one_layer_plus_one_shard(tmp_path):
    base = _sharded_base(tmp_path / "base")
    adapter = _adapter(tmp_path / "adapter", base)
    model_bytes = LAYERS * 4 * ROWS * COLUMNS * 4
    shard_bytes = 4 * ROWS * COLUMNS * 4  # one layer
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(adapter), str(tmp_path / "merged"), str(shard_bytes)],
        capture_output=True,
        text=True,
        timeout=300,
        # glibc serves and frees large blocks with mmap from this size on, so resident memory counts live tensors
        # rather than freed blocks the allocator keeps for reuse.
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(256 * 1024)},
    )
    assert result.returncode == 0, result.stderr
    before, peak = map(int, result.stdout.split())
    added = peak - before
    largest_tensor = ROWS * COLUMNS * 4
    bound = 2 * shard_bytes + 4 * largest_tensor + 8 * MiB
    print(f"merge added {added / MiB:.1f} MiB at peak; bound {bound / MiB:.1f} MiB; model {model_bytes / MiB:.0f} MiB")
    assert added < bound
    assert bound < model_bytes / 2  # the bound itself is far from holding the model
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) >= LAYERS - 1
