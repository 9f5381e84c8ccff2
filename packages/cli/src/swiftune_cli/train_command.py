"""``swiftune train``: LoRA fine-tuning from flags and/or a YAML config file; with no argument, the bundled job."""

from __future__ import annotations

import argparse
import os

from swiftune_cli.config_schema import add_option_arguments

NUM_GPUS_FLAG = "--num-gpus"


def add_parser(commands, parents=()) -> None:
    """Register the ``train`` subcommand."""
    p = commands.add_parser(
        "train",
        parents=list(parents),
        help="fine-tune a model with LoRA",
        description="Fine-tune a model with LoRA (or QLoRA, or in full). Every option is a flag and a key of a YAML "
        "config file (--config); flags override the file. With no argument: the bundled SmolLM2-135M-Instruct on the "
        "bundled Quillhaven dataset, with its answers to held-out questions shown before and after.",
    )
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file of option keys (e.g. lora_r: 32)")
    p.add_argument("--print-config", action="store_true", help="print the merged settings as YAML and exit")
    p.add_argument("--dry-run", action="store_true", help="check model, data, template and memory; do not train")
    add_option_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Merge the settings, then print them, check them, relaunch on several GPUs, or train."""
    from swiftune_cli.config_file import config_to_yaml, merged_config

    config = merged_config(args.config, vars(args))
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    if args.dry_run:
        from swiftune_cli.dry_run import run_dry_run

        return run_dry_run(config)
    from swiftune_cli.config_schema import check_settings

    check_settings(config)  # before launching anything, so that a wrong setting is reported once
    # A distributed worker (torchrun sets WORLD_SIZE) trains; the command the user ran starts the workers.
    if config["num_gpus"] > 1 and "WORLD_SIZE" not in os.environ:
        from swiftune_cli.distributed_launch import relaunch_with_torchrun

        argv = without_num_gpus(getattr(args, "command_argv", []))
        if getattr(args, "debug", False) and "--debug" not in argv:
            argv.append("--debug")  # given before the subcommand, it must reach the workers too
        return relaunch_with_torchrun(config["num_gpus"], argv)
    from swiftune_cli.train_run import run_training

    return run_training(config)


def without_num_gpus(argv: list[str]) -> list[str]:
    """``argv`` without ``--num-gpus N`` / ``--num-gpus=N`` (the workers must not relaunch themselves)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == NUM_GPUS_FLAG:
            skip = True
        elif not item.startswith(NUM_GPUS_FLAG + "="):
            kept.append(item)
    return kept
