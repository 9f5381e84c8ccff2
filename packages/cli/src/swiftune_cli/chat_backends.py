"""The two ways ``swiftune chat`` runs a model: a transformers folder (plus an optional LoRA adapter), or a GGUF
file through llama-cpp-python. Both render the conversation with the model's own chat template and yield the
reply piece by piece as it is generated."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

# Context length when neither the user nor the model's config gives one.
DEFAULT_CONTEXT = 2048


class TransformersChat:
    """A model folder (or a LoRA adapter folder, whose base is read from adapter_config.json) with transformers.

    Args:
        model: a model folder, an adapter folder, or None for the bundled model.
        adapter: a LoRA adapter folder to put on ``model``.
        max_seq_length: context length given to the loader; None: the model's own (no RoPE stretching).
    """

    def __init__(self, model: str | os.PathLike | None, adapter: str | os.PathLike | None = None, max_seq_length=None):
        from transformers import AutoTokenizer

        from swiftune_loader import FastLanguageModel, resolve_model_path

        if model is not None and (Path(model) / "adapter_config.json").is_file():
            if adapter is not None:
                raise ValueError(f"'{model}' is itself an adapter folder; pass its base model with --adapter, or not.")
            model, adapter = _adapter_base(Path(model)), model
        if max_seq_length is None:
            config = json.loads((resolve_model_path(model) / "config.json").read_text())
            max_seq_length = config.get("max_position_embeddings") or DEFAULT_CONTEXT
        self.model, self.tokenizer = FastLanguageModel.from_pretrained(model, max_seq_length=max_seq_length)
        if adapter is not None:
            from peft import PeftModel

            adapter = Path(adapter).expanduser()
            if not (adapter / "adapter_config.json").is_file():
                raise FileNotFoundError(f"'{adapter}' is not a LoRA adapter folder: it has no adapter_config.json.")
            self.model = PeftModel.from_pretrained(self.model, str(adapter))
            if (adapter / "tokenizer_config.json").is_file():  # training may have repaired the tokenizer
                self.tokenizer = AutoTokenizer.from_pretrained(adapter)
        FastLanguageModel.for_inference(self.model)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("This model's tokenizer has no chat template, so a conversation cannot be rendered.")

    def stream(self, messages: list[dict], max_new_tokens: int, temperature: float) -> Iterator[str]:
        """Yield the reply to ``messages`` as text pieces (greedy when ``temperature`` is 0)."""
        from threading import Thread

        import torch
        from transformers import TextIteratorStreamer

        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        device = next(self.model.parameters()).device
        encoded = {key: value.to(device) for key, value in encoded.items()}
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        eos = {self.tokenizer.eos_token_id, *_as_list(self.model.generation_config.eos_token_id)} - {None}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        kwargs = dict(
            **encoded, max_new_tokens=max_new_tokens, streamer=streamer, eos_token_id=sorted(eos), pad_token_id=pad
        )
        errors: list[BaseException] = []

        def generate():
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs, **sampling)
            except BaseException as error:  # noqa: BLE001 - raised again in the caller's thread
                errors.append(error)
                streamer.end()

        thread = Thread(target=generate, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]


class GGUFChat:
    """A GGUF file through llama-cpp-python, with the chat template stored in the file.

    Args:
        path: the .gguf file.
        context_length: llama.cpp's context window; None: the one the model was trained with.
        seed: sampling seed (unused when greedy).
        verbose: let llama.cpp print its loading log.
    """

    def __init__(self, path: str | os.PathLike, context_length=None, seed: int = 0, verbose: bool = False):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ValueError(
                "Chatting with a GGUF file needs llama-cpp-python: `pip install llama-cpp-python`, or chat with the "
                "model folder instead."
            ) from None
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file '{path}' does not exist.")
        try:
            self.llm = Llama(model_path=str(path), n_ctx=context_length or 0, seed=seed, verbose=verbose)
        except ValueError:
            raise ValueError(
                f"llama.cpp could not load '{path}' (not a model it supports, or a broken file); run with --debug to "
                "see llama.cpp's log."
            ) from None

    def stream(self, messages: list[dict], max_new_tokens: int, temperature: float) -> Iterator[str]:
        """Yield the reply to ``messages`` token by token (greedy when ``temperature`` is 0)."""
        chunks = self.llm.create_chat_completion(
            messages=messages, max_tokens=max_new_tokens, temperature=temperature, stream=True
        )
        for chunk in chunks:
            text = chunk["choices"][0]["delta"].get("content")
            if text:
                yield text


def open_chat(model, adapter=None, max_seq_length: int | None = None, seed: int = 0, verbose: bool = False):
    """The backend for ``model``: GGUF for a ``.gguf`` file, transformers otherwise."""
    if model is not None and str(model).lower().endswith(".gguf"):
        if adapter is not None:
            raise ValueError("--adapter applies to model folders; a GGUF file already holds its merged weights.")
        return GGUFChat(model, context_length=max_seq_length, seed=seed, verbose=verbose)
    return TransformersChat(model, adapter, max_seq_length)


def _adapter_base(adapter: Path) -> str:
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"The adapter '{adapter}' does not record its base model; pass --adapter with the base model.")
    return base


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
