import torch

from swiftune_train import ProgressPrinter, sft_config


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
