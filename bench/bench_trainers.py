"""SFT, DPO, ORPO, KTO and GRPO on a random-init Llama-3.2-1B shape: swiftune's trainers vs TRL's, same run.

Each trainer runs twice on the same random model (saved once to a temporary folder), data and settings (bf16,
LoRA r=16 on every linear layer of the decoder, gradient checkpointing, the same optimizer and learning rate):

- trl:      TRL's trainer (ORPO from trl.experimental) on plain transformers + peft;
- swiftune: swiftune_train's trainer on FastLanguageModel.from_pretrained(fast_path=True) + get_peft_model
            (kernels, fused cross-entropy for SFT, chunked log-probabilities for the others, GRPO generating
            through FastLanguageModel.for_inference).

The data are random tokens of a word-level tokenizer whose every word is one token ("t17 t4093 ..."), so each
sequence has exactly the asked length. tokens/s counts the tokens of the sequences trained on per optimizer step
(DPO and ORPO: chosen and rejected rows; GRPO: prompt + completion, generation time included) over the median
time of the steps after warmup. Peak memory is torch.cuda.max_memory_allocated over the whole trainer run.
Prints one ``RESULT {json}`` line per run and a table last:

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python bench/bench_trainers.py [--trainers dpo,grpo]
    python bench/bench_trainers.py --smoke          # a tiny model on the CPU, one measured step each
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

SHAPES = {
    # Llama-3.2-1B (tied embeddings, like the real model).
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, tie_word_embeddings=False,
    ),
}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAINERS = ("sft", "dpo", "orpo", "kto", "grpo")
SYSTEMS = ("trl", "swiftune")
SPECIALS = ("<pad>", "<bos>", "<eos>")


def build_model_folder(folder: Path, shape: str, seq: int, device: str) -> Path:
    """Save a random-init Llama of ``shape`` (bf16) and a word-level tokenizer of the same vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab_size = SHAPES[shape]["vocab_size"]
    words = {f"t{i}": i for i in range(vocab_size - len(SPECIALS))}
    pad, bos, eos = (len(words) + i for i in range(len(SPECIALS)))
    words.update({token: len(words) + i for i, token in enumerate(SPECIALS)})
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<pad>"
    )
    config = LlamaConfig(
        **SHAPES[shape], max_position_embeddings=max(2 * seq, 2048), rope_theta=5e5, pad_token_id=pad,
        bos_token_id=bos, eos_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def random_text(rng: torch.Generator, words: int, vocab_words: int) -> str:
    return " ".join(f"t{i}" for i in torch.randint(0, vocab_words, (words,), generator=rng).tolist())


def build_dataset(trainer: str, rows: int, prompt_len: int, completion_len: int, vocab_words: int):
    """Random-token rows in the format each TRL trainer takes (prompt and completion lengths in tokens)."""
    import datasets

    rng = torch.Generator().manual_seed(1)
    text = lambda n: random_text(rng, n, vocab_words)  # noqa: E731
    if trainer == "sft":  # pre-tokenized: TRL's SFTTrainer uses an input_ids column as it is
        seq = prompt_len + completion_len
        data = [{"input_ids": torch.randint(0, vocab_words, (seq,), generator=rng).tolist()} for _ in range(rows)]
    elif trainer in ("dpo", "orpo"):
        data = [{"prompt": text(prompt_len), "chosen": text(completion_len), "rejected": text(completion_len)}]
        data = [dict(data[0]) | {"chosen": text(completion_len)} for _ in range(rows)]
    elif trainer == "kto":
        data = [
            {"prompt": text(prompt_len), "completion": text(completion_len), "label": i % 2 == 0} for i in range(rows)
        ]
    else:
        data = [{"prompt": text(prompt_len)} for _ in range(rows)]
    return datasets.Dataset.from_list(data)


def even_token_fraction(completion_ids, **kwargs):
    """GRPO's reward, a plain Python callable: the fraction of even token ids in each completion."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def trainer_classes(system: str, trainer: str):
    """(config class, trainer class) of ``system`` for ``trainer``."""
    if system == "trl":
        import trl

        if trainer == "orpo":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from trl.experimental.orpo import ORPOConfig, ORPOTrainer
            return ORPOConfig, ORPOTrainer
        name = trainer.upper()
        return getattr(trl, f"{name}Config"), getattr(trl, f"{name}Trainer")
    from swiftune_train import arguments

    module = {"sft": "trainer", "dpo": "dpo", "orpo": "orpo", "kto": "kto", "grpo": "grpo"}[trainer]
    trainer_module = __import__(f"swiftune_train.{module}", fromlist=["_"])
    name = trainer.upper()
    return getattr(arguments, f"{name}Config"), getattr(trainer_module, f"{name}Trainer")


def load_model(system: str, folder: Path, device: str, seq: int):
    """The LoRA model of ``system``: plain transformers + peft, or FastLanguageModel with its fast path."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if system == "trl":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map={"": 0} if device == "cuda" else None, attn_implementation="sdpa"
        )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        return get_peft_model(model, lora)
    from swiftune_loader import FastLanguageModel

    # Checkpointing that recomputes each layer, as the baseline does (not the "offload" default): same memory trade.
    model, _ = FastLanguageModel.from_pretrained(
        str(folder), max_seq_length=2 * seq, dtype=dtype, fast_path=True, attn_implementation="sdpa",
        use_gradient_checkpointing=True,
    )  # fmt: skip
    return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS)


class StepTimer:
    """A TrainerCallback that times each optimizer step (CUDA-synchronized)."""

    def __new__(cls, device: str):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times, self._start = [], None

            def _sync(self):
                if device == "cuda":
                    torch.cuda.synchronize()

            def on_step_begin(self, args, state, control, **kwargs):
                self._sync()
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self._sync()
                self.times.append(time.perf_counter() - self._start)

        return _Timer()


def run(system: str, trainer: str, folder: Path, opts, device: str) -> dict:
    from transformers import AutoTokenizer

    config_class, trainer_class = trainer_classes(system, trainer)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt_len, completion_len = (opts.grpo_prompt, opts.grpo_completion) if trainer == "grpo" else (
        opts.seq // 2, opts.seq - opts.seq // 2
    )  # fmt: skip
    batch = {"sft": opts.batch, "dpo": opts.batch // 2, "orpo": opts.batch // 2, "kto": opts.batch}.get(trainer)
    batch = batch or opts.generations
    steps = opts.warmup + opts.steps
    rows = batch * steps if trainer != "grpo" else steps
    vocab_words = len(tokenizer) - len(SPECIALS)
    dataset = build_dataset(trainer, rows, prompt_len, completion_len, vocab_words)
    settings = dict(
        output_dir=str(folder.parent / f"{system}-{trainer}"), per_device_train_batch_size=max(batch, 1),
        max_steps=steps, learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=device == "cuda", use_cpu=device != "cuda",
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch", dataloader_pin_memory=False,
    )  # fmt: skip
    full = prompt_len + completion_len + 8  # room for special tokens: nothing is truncated
    settings.update(
        {
            "sft": dict(max_length=full, packing=False),
            "dpo": dict(max_length=full),
            "orpo": dict(max_length=full, max_completion_length=completion_len + 8),
            "kto": dict(max_length=full, train_sampling_strategy="sequential"),
            "grpo": dict(
                num_generations=opts.generations,
                max_completion_length=completion_len,
                generation_kwargs={"min_new_tokens": completion_len},
            ),  # fmt: skip
        }[trainer]
    )
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = load_model(system, folder, device, opts.seq)
    extra = {"reward_funcs": even_token_fraction} if trainer == "grpo" else {}
    if system == "swiftune":
        extra["default_callbacks"] = opts.default_callbacks
    timer = StepTimer(device)
    run_trainer = trainer_class(
        model=model, args=config_class(**settings), train_dataset=dataset, processing_class=tokenizer,
        callbacks=[timer], **extra,
    )  # fmt: skip
    run_trainer.train()
    measured = timer.times[opts.warmup :] or timer.times
    step_s = statistics.median(measured)
    rows_per_step = 2 * batch if trainer in ("dpo", "orpo") else batch
    tokens_per_step = rows_per_step * (prompt_len + completion_len)
    losses = [entry["loss"] for entry in run_trainer.state.log_history if "loss" in entry]
    fast = getattr(run_trainer, "chunked_logprobs", getattr(run_trainer, "fused_loss", None))
    result = {
        "trainer": trainer, "system": system, "shape": opts.shape, "seq": prompt_len + completion_len,
        "rows_per_step": rows_per_step, "tokens_per_step": tokens_per_step, "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens_per_step / step_s, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "first_loss": round(losses[0], 5) if losses else None, "swiftune_fast_loss": fast,
        "adapter_dtype": str(next(p.dtype for n, p in model.named_parameters() if "lora_A" in n)),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }  # fmt: skip
    del run_trainer, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--trainers", default=",".join(TRAINERS), help="comma-separated subset of " + ",".join(TRAINERS)
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=1024, help="tokens per row (prompt half, completion half)")
    parser.add_argument("--batch", type=int, default=4, help="rows per step (DPO/ORPO: pairs = batch / 2)")
    parser.add_argument("--generations", type=int, default=8, help="GRPO completions per step (one prompt)")
    parser.add_argument("--grpo-prompt", type=int, default=256)
    parser.add_argument("--grpo-completion", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="measured steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--default-callbacks", action="store_true", help="keep swiftune's default callbacks on")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 1 warmup + 1 measured step")
    opts = parser.parse_args()
    if opts.smoke:
        opts.shape, opts.seq, opts.batch, opts.generations, opts.steps, opts.warmup = "tiny", 32, 4, 4, 1, 1
        opts.grpo_prompt, opts.grpo_completion = 8, 8
    trainers = [t for t in opts.trainers.split(",") if t]
    unknown = sorted(set(trainers) - set(TRAINERS)) + sorted(set(opts.systems.split(",")) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown trainers/systems {unknown}; choose from {TRAINERS} and {SYSTEMS}.")
    device = "cuda" if torch.cuda.is_available() and not opts.smoke else "cpu"
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-trainers-") as tmp:
        folder = build_model_folder(Path(tmp) / "model", opts.shape, opts.seq, device)
        for trainer in trainers:
            for system in opts.systems.split(","):
                result = run(system, trainer, folder, opts, device)
                print("RESULT " + json.dumps(result), flush=True)
                results.append(result)
    print(f"shape={opts.shape} seq={opts.seq} batch={opts.batch} device={results[0]['device'] if results else device}")
    print(f"{'trainer':<8}{'system':<10}{'tokens/s':>12}{'vs trl':>8}{'peak GiB':>10}{'step s':>9}{'fast':>7}")
    for r in results:
        base = next((b for b in results if b["trainer"] == r["trainer"] and b["system"] == "trl"), r)
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        print(
            f"{r['trainer']:<8}{r['system']:<10}{r['tokens_per_s']:>12.0f}{ratio:>8.2f}{str(r['peak_gib']):>10}"
            f"{r['step_s']:>9.3f}{str(r['swiftune_fast_loss']):>7}"
        )


if __name__ == "__main__":
    main()
