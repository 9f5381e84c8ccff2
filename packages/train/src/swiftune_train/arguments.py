"""Training arguments: TRL's SFTConfig with defaults that suit LoRA and work on any machine."""

from __future__ import annotations

import torch
from trl import SFTConfig

# transformers 5 renamed gradient_checkpointing to activation_checkpointing; older 5.x releases only know the first.
_CHECKPOINTING_FIELD = (
    "activation_checkpointing"
    if "activation_checkpointing" in SFTConfig.__dataclass_fields__
    else "gradient_checkpointing"
)


def sft_config(
    output_dir: str, model_dtype: torch.dtype | None = None, gradient_checkpointing: bool = True, **overrides
):
    """Build an ``SFTConfig`` with LoRA-friendly defaults; every default can be overridden by keyword.

    Defaults: learning rate 2e-4, linear schedule with a short warmup, logging every step, no intermediate
    checkpoints, no external reporting, and mixed precision chosen from the model's dtype and the device (bf16 or
    fp16 on a GPU, none on the CPU, where transformers refuses bf16 training).

    Args:
        output_dir: where the trainer writes checkpoints and logs.
        model_dtype: the dtype the model was loaded in.
        gradient_checkpointing: recompute activations in backward.
        **overrides: any ``SFTConfig`` field.
    """
    on_gpu = torch.cuda.is_available()
    defaults = {
        "output_dir": output_dir,
        "learning_rate": 2e-4,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0.05,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "bf16": on_gpu and model_dtype == torch.bfloat16,
        "fp16": on_gpu and model_dtype == torch.float16,
        "use_cpu": not on_gpu,
        "dataloader_pin_memory": on_gpu,
        "disable_tqdm": True,
        # Report a NaN loss as NaN (transformers would otherwise replace it by the running mean).
        "logging_nan_inf_filter": False,
        "optim": "adamw_torch_fused" if on_gpu else "adamw_torch",
        _CHECKPOINTING_FIELD: gradient_checkpointing,
    }
    if "gradient_checkpointing" in overrides and _CHECKPOINTING_FIELD != "gradient_checkpointing":
        overrides[_CHECKPOINTING_FIELD] = overrides.pop("gradient_checkpointing")
    defaults.update(overrides)
    return SFTConfig(**defaults)
