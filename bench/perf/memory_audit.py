"""Where the training memory goes: bytes held for backward per decoder layer and per tensor, and the weights by dtype.

Builds a model of Llama-3.1-8B width with a few layers (smaller vocab by default, it only scales the embeddings),
loads it through swiftune's public API (FastLanguageModel.from_pretrained + get_peft_model, the fused loss as the
train package computes it) in each checkpointing mode, and through transformers + peft for comparison, then runs
one forward under bf16 autocast while ``torch.autograd.graph.saved_tensors_hooks`` records every tensor autograd
keeps. Parameters are not counted as saved (they live anyway). Runs on the CPU (bitsandbytes 4-bit runs there):

    uv run python bench/perf/memory_audit.py --layers 2 --seq 256 --vocab 32000
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TARGETS, model_folder, nf4_config, random_batch  # noqa: E402


class SavedTensorAudit:
    """Records the storages autograd saves during forward, labelled by the decoder layer running at the time."""

    def __init__(self, model) -> None:
        self.where = "outside"
        self.param_ptrs = {p.data.data_ptr() for p in model.parameters()}
        self.seen: dict[int, tuple[str, int, tuple, torch.dtype]] = {}
        self.hooks = []
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for index, layer in enumerate(base.model.layers):
            self.hooks.append(layer.register_forward_pre_hook(lambda *_, i=index: self._enter(f"layer{i}")))
            self.hooks.append(layer.register_forward_hook(lambda *_: self._enter("outside")))

    def _enter(self, label: str) -> None:
        self.where = label

    def pack(self, tensor: torch.Tensor):
        if tensor.device.type != "meta" and tensor.data_ptr() not in self.param_ptrs:
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self.seen:
                self.seen[key] = (self.where, storage.nbytes(), tuple(tensor.shape), tensor.dtype)
        return tensor

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def by_label(self) -> dict[str, int]:
        totals: dict[str, int] = collections.Counter()
        for label, nbytes, _, _ in self.seen.values():
            totals[label] += nbytes
        return dict(totals)

    def top(self, n: int = 8) -> list[tuple[str, tuple, str, int]]:
        counted: dict[tuple, int] = collections.Counter()
        for label, nbytes, shape, dtype in self.seen.values():
            counted[("layer" if label.startswith("layer") else label, shape, str(dtype))] += nbytes
        return sorted(((*k, v) for k, v in counted.items()), key=lambda item: -item[-1])[:n]


def weights_by_dtype(model) -> dict[str, int]:
    """Bytes of every parameter (and non-persistent buffer) by (role, dtype): what lives for the whole run."""
    totals: dict[str, int] = collections.Counter()
    for name, p in model.named_parameters():
        role = "lora" if "lora_" in name else "embed" if "embed" in name else "lm_head" if "lm_head" in name else None
        role = role or ("norm" if "norm" in name else "linear")
        totals[f"{role}:{p.dtype}".replace("torch.", "")] += p.numel() * p.element_size()
    for _, b in model.named_buffers():
        totals[f"buffer:{b.dtype}".replace("torch.", "")] += b.numel() * b.element_size()
    return dict(totals)


def load_swiftune(folder: Path, checkpointing, quant: bool):
    from swiftune_loader import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        str(folder),
        max_seq_length=4096,
        load_in_4bit=quant,
        dtype=torch.bfloat16,
        use_gradient_checkpointing=checkpointing,
        device_map="cpu",
        fix_tokenizer=False,
        fast_path=True,  # on by default on a GPU only: the audit follows the GPU's code path
    )
    model = FastLanguageModel.get_peft_model(model, target_modules=TARGETS, use_gradient_checkpointing=checkpointing)
    from swiftune_loader.patching import fused_causal_lm_loss

    return model, lambda m, b: fused_causal_lm_loss(m, b)


def load_peft(folder: Path, checkpointing, quant: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    q = nf4_config() if quant else None
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, quantization_config=q)
    if quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(checkpointing))
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(**_lora(), target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()  # transformers checkpoints only in training mode
    return model, lambda m, b: m(**b).loss


def _lora() -> dict:
    from common import LORA

    return dict(LORA)


def audit(name: str, model, loss_of, batch: dict) -> dict:
    tokens = batch["input_ids"].numel()
    recorder = SavedTensorAudit(model)
    with torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, batch)
    recorder.close()
    labels = recorder.by_label()
    layer_bytes = [v for k, v in labels.items() if k.startswith("layer")]
    loss.backward()  # it must still train
    grads = sum(1 for p in model.parameters() if p.grad is not None)
    return {
        "name": name,
        "loss": round(float(loss), 5),
        "grads": grads,
        "saved_per_layer_per_token": round(max(layer_bytes, default=0) / tokens, 1),
        "saved_outside_layers_per_token": round(labels.get("outside", 0) / tokens, 1),
        "top_saved": recorder.top(),
        "weights": weights_by_dtype(model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tiny", action="store_true", help="tiny widths, for a quick smoke run")
    parser.add_argument("--no-quant", action="store_true", help="bf16 LoRA instead of NF4 QLoRA")
    parser.add_argument("--only", default="", help="comma-separated subset of the configurations")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    shape = "tiny" if args.tiny else "8b"
    overrides = {"num_hidden_layers": args.layers, "vocab_size": args.vocab if not args.tiny else 384}
    quant = not args.no_quant
    runs = {
        "swiftune offload": (load_swiftune, "offload"),
        "swiftune True": (load_swiftune, True),
        "swiftune False": (load_swiftune, False),
        "peft ckpt": (load_peft, True),
    }
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    with tempfile.TemporaryDirectory() as root:
        folder = model_folder(shape, root, max_positions=4096, **overrides)
        batch = random_batch(overrides["vocab_size"], 1, args.seq, dev="cpu")
        for name, (loader, mode) in runs.items():
            model, loss_of = loader(folder, mode, quant)
            result = audit(name, model, loss_of, batch)
            print(f"== {name}: loss {result['loss']} ({result['grads']} grads)")
            print(
                f"   saved for backward: {result['saved_per_layer_per_token']} B/token in the worst layer, "
                f"{result['saved_outside_layers_per_token']} B/token outside the layers"
            )
            if name == "swiftune offload":
                from swiftune_loader.memory_plan import layer_memory

                inner = model.get_base_model()
                residual = inner.get_input_embeddings().weight.element_size()
                estimate = layer_memory(inner.config, residual_bytes=max(2, residual))
                print(f"   memory_plan estimate: kept {estimate.kept} B/token, checkpointed {estimate.checkpointed}")
            for label, shape_, dtype, nbytes in result["top_saved"]:
                print(f"   {label:<8} {str(shape_):<28} {dtype:<16} {nbytes / 2**10:11.1f} KiB")
            weights = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(result["weights"].items()))
            print(f"   weights: {weights}", flush=True)
            del model


if __name__ == "__main__":
    main()
