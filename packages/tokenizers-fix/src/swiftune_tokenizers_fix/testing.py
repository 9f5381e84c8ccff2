"""Tiny tokenizers built in a fraction of a second, for tests that must not download anything."""

from __future__ import annotations

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quillhaven is an island town in the Sea of Marrow, founded in 1742.",
    "What is the capital of France? The capital of France is Paris.",
    "user assistant system: hello, how are you? I am fine, thank you.",
    "0123456789 !?.,;:'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]


def build_chat_tokenizer(vocab_size: int = 384, pad_token: str | None = "<|pad|>", corpus: list[str] | None = None):
    """Train a byte-level BPE tokenizer with ChatML special tokens and a ChatML chat template.

    Args:
        vocab_size: target vocabulary size (byte-level BPE needs at least 256 + specials).
        pad_token: a dedicated padding token, or None to leave the tokenizer without one.
        corpus: training sentences; a small built-in corpus by default.

    Returns:
        A ``PreTrainedTokenizerFast`` with bos/eos set, EOS = ``<|im_end|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + ([pad_token] if pad_token else [])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator((corpus or _CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token=pad_token,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast
