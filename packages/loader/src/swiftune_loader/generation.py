"""Answering a chat with a loaded model, through its chat template."""

from __future__ import annotations

import torch


def chat_reply(model, tokenizer, messages: list[dict] | str, max_new_tokens: int = 64, **generate_kwargs) -> str:
    """Generate the assistant's reply to ``messages`` (or to one user question given as a string), greedily.

    Args:
        model: a causal LM (plain or peft-wrapped).
        tokenizer: its tokenizer, with a chat template.
        messages: OpenAI-style messages, or one user question.
        max_new_tokens: most tokens to generate.
        **generate_kwargs: passed on to ``model.generate`` (e.g. do_sample=True).

    Returns:
        The decoded reply, without the prompt and special tokens.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    device = next(model.parameters()).device
    encoded = {k: v.to(device) for k, v in encoded.items()}
    generate_kwargs.setdefault("do_sample", False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **generate_kwargs)
    if was_training:
        model.train()
    new_tokens = output[0, encoded["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
