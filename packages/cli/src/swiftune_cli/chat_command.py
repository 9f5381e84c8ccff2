"""``swiftune chat``: talk to a model folder (+ a LoRA adapter) or a GGUF file, with the reply streamed."""

from __future__ import annotations

import argparse
import sys

QUIT_COMMANDS = ("/exit", "/quit")


def add_parser(commands, parents=()) -> None:
    """Register the ``chat`` subcommand."""
    p = commands.add_parser(
        "chat",
        parents=list(parents),
        help="chat with a model folder, an adapter, or a GGUF file",
        description="Chat with a model through its chat template, the reply streamed as it is generated. MODEL is a "
        "model folder, a LoRA adapter folder (from swiftune train), or a .gguf file (needs llama-cpp-python). "
        "Greedy decoding unless --temperature is above 0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "model", nargs="?", default=None, help="model folder, adapter folder or .gguf file (default: bundled)"
    )
    p.add_argument("--adapter", default=None, help="LoRA adapter folder to put on MODEL")
    p.add_argument("--prompt", default=None, help="answer this one message and exit (no interaction)")
    p.add_argument("--system", default=None, help="system message at the start of the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--max-seq-length", type=int, default=None, help="context length (default: the model's own)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Answer ``--prompt`` once, or hold a conversation on stdin until end of input or /exit."""
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}.")
    if args.temperature < 0:
        raise ValueError(f"--temperature must not be negative, got {args.temperature}.")
    from swiftune_cli.chat_backends import open_chat

    chat = open_chat(args.model, args.adapter, args.max_seq_length, args.seed, verbose=getattr(args, "debug", False))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        _answer(chat, messages + [{"role": "user", "content": args.prompt}], args)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("swiftune chat: /reset forgets the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if text in QUIT_COMMANDS:
            break
        if text == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        messages.append(
            {"role": "assistant", "content": _answer(chat, messages, args, prefix="model> " if interactive else "")}
        )
    return 0


def _answer(chat, messages: list[dict], args, prefix: str = "") -> str:
    """Stream the reply to stdout; return it whole."""
    print(prefix, end="", flush=True)
    pieces = []
    for piece in chat.stream(messages, args.max_new_tokens, args.temperature):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    return "".join(pieces).strip()
