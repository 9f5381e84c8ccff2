"""fix_tokenizer: every tokenizer repair, in the order in which one repair's result feeds the next."""

from __future__ import annotations

from swiftune_tokenizers_fix._validate import require_fast_tokenizer, require_model
from swiftune_tokenizers_fix.bos import fix_double_bos
from swiftune_tokenizers_fix.chat_template import fix_generation_prompt
from swiftune_tokenizers_fix.embeddings import fix_embedding_size
from swiftune_tokenizers_fix.pad_token import fix_pad_token
from swiftune_tokenizers_fix.padding_side import set_padding_side
from swiftune_tokenizers_fix.report import Repair
from swiftune_tokenizers_fix.special_tokens import fix_special_tokens


def fix_tokenizer(tokenizer, model=None, padding_side: str = "right") -> tuple[object, list[Repair]]:
    """Find and repair the tokenizer defects that make fine-tunes fail, and say what was done.

    In order: special-token attributes that disagree with the vocabulary (EOS must be right before a pad token is
    chosen apart from it), a pad token distinct from EOS, the padding side, a chat template without a
    generation-prompt branch, a double BOS, and (with a model) token ids beyond the embedding matrix, last because
    the pad repair may have added a token. Each repair logs one WARNING line. A tokenizer with nothing wrong comes
    back unchanged with an empty list, and running this twice repairs nothing the second time.

    Args:
        tokenizer: a fast transformers tokenizer, repaired in place.
        model: optional transformers model: its configs get the tokenizer's special ids and its embeddings grow to
            cover every token id.
        padding_side: ``"right"`` for training (the default) or ``"left"`` for generation.

    Returns:
        ``(tokenizer, repairs)``: the same tokenizer object and the list of :class:`Repair` applied.

    Raises:
        TypeError: ``tokenizer`` is not a fast tokenizer or ``model`` is not a transformers model.
        ValueError: a defect that cannot be repaired automatically; the message says what to change.
    """
    require_fast_tokenizer(tokenizer, "fix_tokenizer")
    if model is not None:
        require_model(model, "fix_tokenizer")
    steps = [
        lambda: fix_special_tokens(tokenizer, model),
        lambda: fix_pad_token(tokenizer, model),
        lambda: set_padding_side(tokenizer, padding_side),
        lambda: fix_generation_prompt(tokenizer),
        lambda: fix_double_bos(tokenizer),
    ]
    if model is not None:
        steps.append(lambda: fix_embedding_size(tokenizer, model))
    repairs = [repair for step in steps if (repair := step()) is not None]
    return tokenizer, repairs
