import dataclasses
import importlib.util
import warnings

import pytest
import torch
import trl
from transformers import HfArgumentParser

import swiftune_train
from swiftune_train import ProgressPrinter, default_optimizer, sft_config

CONFIG_NAMES = ("SFTConfig", "DPOConfig", "ORPOConfig", "KTOConfig", "GRPOConfig")


def _trl_config(name):
    if name == "ORPOConfig":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig
    return getattr(trl, name)


def test_lora_defaults_on_the_cpu(tmp_path):
    args = sft_config(str(tmp_path), model_dtype=torch.float32)
    assert args.learning_rate == 2e-4 and args.lr_scheduler_type == "linear"
    assert args.use_cpu and not args.bf16 and not args.fp16 and args.save_strategy == "no"


def test_overrides_win(tmp_path):
    args = sft_config(str(tmp_path), learning_rate=1e-3, gradient_checkpointing=False, per_device_train_batch_size=3)
    assert args.learning_rate == 1e-3 and args.per_device_train_batch_size == 3
    assert not args.gradient_checkpointing


def test_progress_printer_records_losses_and_stops_on_nan():
    class State:
        global_step, max_steps = 3, 10

    class Control:
        should_training_stop = False

    lines, control = [], Control()
    printer = ProgressPrinter(lines.append)
    printer.on_train_begin(None, State(), control)
    printer.on_log(None, State(), control, logs={"loss": 1.5, "learning_rate": 1e-4})
    assert printer.losses == [(3, 1.5)] and lines[0].startswith("step 3/10  loss 1.5000  lr 1.0e-04")
    printer.on_log(None, State(), control, logs={"loss": float("nan")})
    assert control.should_training_stop and printer.non_finite_loss != printer.non_finite_loss  # NaN

    printer.on_log(None, State(), control, logs={"loss": 1.0, "tokens_per_second": 1520.4, "peak_memory_mb": 811.6})
    assert lines[-1].endswith("left  1520 tok/s  peak 812 MB")


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_is_trls_with_lora_defaults_and_an_embedding_learning_rate(name, tmp_path):
    cls = getattr(swiftune_train, name)
    assert issubclass(cls, _trl_config(name)) and dataclasses.is_dataclass(cls)
    args = cls(output_dir=str(tmp_path))
    assert args.learning_rate == 2e-4 and args.lr_scheduler_type == "linear" and args.warmup_steps == 0.05
    assert args.logging_steps == 1 and args.report_to == [] and args.embedding_learning_rate is None
    assert args.optim == default_optimizer(
        torch.cuda.is_available(), importlib.util.find_spec("bitsandbytes") is not None
    )
    if not torch.cuda.is_available():
        assert args.use_cpu and not args.bf16 and not args.fp16 and not args.dataloader_pin_memory
    assert cls(output_dir=str(tmp_path), embedding_learning_rate=1e-5, optim="sgd").embedding_learning_rate == 1e-5


def test_default_optimizer_is_8bit_adamw_only_on_a_gpu_with_bitsandbytes():
    assert default_optimizer(cuda_available=True, bitsandbytes_available=True) == "adamw_8bit"
    assert default_optimizer(cuda_available=True, bitsandbytes_available=False) == "adamw_torch_fused"
    assert default_optimizer(cuda_available=False, bitsandbytes_available=True) == "adamw_torch"
    assert default_optimizer(cuda_available=False, bitsandbytes_available=False) == "adamw_torch"


def test_bad_embedding_learning_rate_is_refused(tmp_path):
    with pytest.raises(ValueError, match="embedding_learning_rate must be a positive number"):
        swiftune_train.SFTConfig(output_dir=str(tmp_path), embedding_learning_rate=0.0)


def test_checkpointing_by_either_name_without_deprecation_warnings(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert swiftune_train.SFTConfig(output_dir=str(tmp_path)).gradient_checkpointing  # on, as in TRL
        assert not swiftune_train.SFTConfig(
            output_dir=str(tmp_path), gradient_checkpointing=False
        ).gradient_checkpointing
        off = swiftune_train.DPOConfig(output_dir=str(tmp_path), activation_checkpointing=False)
        assert not off.gradient_checkpointing


def test_command_line_parsing_knows_the_new_field(tmp_path):
    (args,) = HfArgumentParser(swiftune_train.SFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--embedding_learning_rate", "5e-6", "--optim", "sgd"]
    )
    assert args.embedding_learning_rate == 5e-6 and args.optim == "sgd" and args.learning_rate == 2e-4
