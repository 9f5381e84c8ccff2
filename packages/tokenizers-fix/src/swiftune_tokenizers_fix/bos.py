"""A double BOS: the chat template writes BOS and the tokenizer adds another when the text is encoded."""

from __future__ import annotations

from swiftune_tokenizers_fix._validate import require_fast_tokenizer
from swiftune_tokenizers_fix.backend import remove_special_token_from_post_processor
from swiftune_tokenizers_fix.chat_template import USER_PROBE, render_chat
from swiftune_tokenizers_fix.report import Repair, report


def fix_double_bos(tokenizer) -> Repair | None:
    """Stop the tokenizer from adding BOS when its chat template already writes one.

    Text rendered by such a template and encoded the default way starts with two BOS tokens, a sequence the model
    never saw in pretraining. The template is what the model was tuned with, so it keeps its BOS and the tokenizer
    stops adding one: rendered chats then encode with exactly one BOS both ways (``add_special_tokens`` True or
    False, which ``apply_chat_template(tokenize=True)`` uses). Plain text no longer gets BOS automatically; prepend
    ``tokenizer.bos_token`` where a raw-text dataset needs it.

    Args:
        tokenizer: a fast tokenizer, changed in place.

    Returns:
        The repair, or None when there is no double BOS.
    """
    require_fast_tokenizer(tokenizer, "fix_double_bos")
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    text = render_chat(tokenizer, [{"role": "user", "content": USER_PROBE}], add_generation_prompt=True)
    if bos is None or text is None or not text.startswith(bos):
        return None
    before = tokenizer(text)["input_ids"][:2]
    if before != [bos_id, bos_id]:
        return None
    if remove_special_token_from_post_processor(tokenizer, bos):
        # transformers rebuilds the post-processor from this flag whenever add_eos_token changes: keep it in step.
        object.__setattr__(tokenizer, "_add_bos_token", False)
    else:
        # BOS comes from somewhere else than the post-processor: let transformers rebuild it without BOS.
        tokenizer.add_bos_token = False
    tokenizer.init_kwargs["add_bos_token"] = False
    if tokenizer(text)["input_ids"][:2] == [bos_id, bos_id]:
        raise ValueError(
            "The chat template writes BOS and the tokenizer still adds another after swiftune removed it; encode "
            "rendered chats with add_special_tokens=False."
        )
    return report(
        "double_bos",
        f"a chat template that writes BOS {bos!r} while the tokenizer adds another (encoded chats start {before})",
        "the tokenizer no longer adds BOS; the template's stays (prepend tokenizer.bos_token to raw text yourself)",
    )
