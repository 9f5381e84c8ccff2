"""The ``swiftune`` command. Parsing imports no torch: each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import sys

from swiftune_cli import chat_command, export_command, inspect_command, train_command

# Exceptions that carry a message written for the user; anything else is reported with its type name.
_USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, FloatingPointError)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (and exit status 2), pointing to --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``swiftune`` and its subcommands."""
    parser = _Parser(
        prog="swiftune",
        description="Fast LoRA / QLoRA fine-tuning of language models, export of the result, chat and inspection.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # The same flag after the subcommand; SUPPRESS keeps a subcommand from resetting a --debug given before it.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (train_command, export_command, chat_command, inspect_command):
        module.add_parser(commands, parents=[common])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``swiftune``; returns the exit status (0 on success, 1 on an error, 2 on a usage error)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is not None:
        # The subcommand's own arguments, for a command that relaunches itself (swiftune train --num-gpus N).
        args.command_argv = argv[argv.index(args.command) + 1 :]
    if args.version:
        from importlib.metadata import version

        print(f"swiftune {version('swiftune-cli')}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    _offline_and_quiet(args.debug)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"\nswiftune {args.command}: interrupted.", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure becomes one line, unless --debug asks for the trace
        if args.debug:
            raise
        print(f"swiftune {args.command}: error: {error_sentence(error)}", file=sys.stderr)
        return 1


def error_sentence(error: BaseException) -> str:
    """The error as one line: its message (line breaks folded), with the type name when it is not a user error."""
    message = " ".join(str(error).split()) or "no message"
    if isinstance(error, _USER_ERRORS):
        return message
    return f"{type(error).__name__}: {message} (run with --debug for the traceback)"


def _offline_and_quiet(debug: bool) -> None:
    """Never reach a model hub; without --debug, no library progress bars and one line per Python warning."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if debug:
        return
    # Read by datasets and huggingface_hub (and so transformers) when they are imported, which is after this.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes warns on every CPU import that an optional kernel download is unavailable; it changes nothing.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"swiftune: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
