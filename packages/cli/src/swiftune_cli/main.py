"""The ``swiftune`` command. Parsing imports no torch: each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import sys

from swiftune_cli import export_command, train_command


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``swiftune`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="swiftune",
        description="Fast LoRA / QLoRA fine-tuning of language models, and export of the result.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train_command.add_parser(commands)
    export_command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``swiftune``; returns the exit status (0 on success, 1 on a user error, 2 on a usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import version

        print(f"swiftune {version('swiftune-cli')}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as error:
        print(f"swiftune {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"swiftune {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
