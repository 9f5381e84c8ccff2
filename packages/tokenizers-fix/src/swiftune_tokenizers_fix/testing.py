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


def add_bos_on_encode(tokenizer):
    """Make ``tokenizer`` insert its BOS before every encoded text, as Llama and Gemma tokenizers do.

    Returns:
        The same tokenizer.
    """
    from tokenizers import processors

    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    return tokenizer


def build_sentencepiece_folder(
    directory, model_type: str = "bpe", vocab_size: int = 400, corpus: list[str] | None = None
):
    """Train a sentencepiece model and save it with a matching fast tokenizer, as Llama 2 and Mistral folders hold.

    The folder gets ``tokenizer.model`` (the slow, sentencepiece side), ``tokenizer.json`` built from it (which
    encodes exactly as the model does, BOS ``<s>`` added) and ``tokenizer_config.json``.

    Args:
        directory: the folder to write (created if needed).
        model_type: ``"bpe"`` or ``"unigram"``.
        vocab_size: upper bound of the vocabulary (byte fallback takes 256 pieces of it).
        corpus: training sentences; a small built-in corpus by default.

    Returns:
        The folder as a ``Path``.
    """
    from pathlib import Path

    import sentencepiece
    from transformers import PreTrainedTokenizerFast

    from swiftune_tokenizers_fix.sentencepiece_fast import sentencepiece_to_tokenizers

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter((corpus or _CORPUS) * 4),
        model_prefix=str(folder / "tokenizer"),
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=sentencepiece_to_tokenizers(folder / "tokenizer.model"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    add_bos_on_encode(fast)
    fast.save_pretrained(folder)
    return folder


def build_tiny_llama(tokenizer=None, vocab_size: int | None = None, tie_word_embeddings: bool = False, seed: int = 0):
    """A randomly initialised LlamaForCausalLM (hidden 32, 2 layers) sized for ``tokenizer`` or ``vocab_size``.

    Its config carries the tokenizer's bos/eos/pad ids, as a real checkpoint's does.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids = {}
    if tokenizer is not None:
        ids = {f"{r}_token_id": getattr(tokenizer, f"{r}_token_id") for r in ("bos", "eos", "pad")}
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        **ids,
    )
    return LlamaForCausalLM(config).eval()
