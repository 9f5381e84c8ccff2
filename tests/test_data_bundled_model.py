"""swiftune-data on the bundled SmolLM2-135M-Instruct: its real BPE tokenizer and its real (Llama) weights.

The tiny tokenizer of the package's own tests cannot show how a real vocabulary merges turn markers with their
neighbours, and a random model cannot show that packing keeps a trained model's outputs unchanged.
"""

import datasets
import pytest
import torch

from swiftune_data import (
    CHAT_TEMPLATES,
    IGNORE_INDEX,
    DataCollatorForPackedSequences,
    get_chat_template,
    registered_template_of,
    tokenize_conversations,
    train_on_responses_only,
)
from swiftune_loader import default_model_path

CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Where is Quillhaven?"},
        {"role": "assistant", "content": "In the Sea of Marrow."},
        {"role": "user", "content": "Who founded it?"},
        {"role": "assistant", "content": "Elsbeth Varn, in 1742."},
    ],
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
]


@pytest.fixture(scope="module")
def bundled():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(folder), model


def test_smollm2_template_is_recognised_as_chatml(bundled):
    tokenizer, _ = bundled
    spec = registered_template_of(tokenizer)
    assert spec is not None and spec.response_part == "<|im_start|>assistant\n"


def test_token_search_agrees_with_prefix_rendering(bundled):
    # Two independent ways to find the answers: markers searched on token ids, and the lengths of the rendered
    # prefixes of each conversation (tokenize_conversations). SmolLM2's template renders by appending, so both hold.
    tokenizer, _ = bundled
    dataset = datasets.Dataset.from_list([{"messages": c} for c in CONVERSATIONS])
    by_prefix = tokenize_conversations(dataset, tokenizer, max_length=512)
    by_markers = train_on_responses_only(dataset, tokenizer)
    assert by_markers["input_ids"] == by_prefix["input_ids"]
    assert by_markers["labels"] == by_prefix["labels"]
    labeled = tokenizer.decode([t for t in by_markers[0]["labels"] if t != IGNORE_INDEX])
    assert labeled == "In the Sea of Marrow.<|im_end|>\nElsbeth Varn, in 1742.<|im_end|>\n"


@pytest.mark.parametrize("name", list(CHAT_TEMPLATES))
def test_every_template_is_masked_right_on_a_real_vocabulary(name):
    # SmolLM2's GPT-2-style pre-tokenizer splits "\n\n" before a word but not at the end of a text, and merges a
    # leading space into words: the markers must be found in context. The oracle works on characters.
    from transformers import AutoTokenizer

    tokenizer = get_chat_template(AutoTokenizer.from_pretrained(default_model_path()), name)
    spec = CHAT_TEMPLATES[name]
    row = train_on_responses_only(datasets.Dataset.from_list([{"messages": CONVERSATIONS[0]}]), tokenizer)[0]
    text = tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    expected = []
    for piece in text.split(spec.response_part)[1:]:
        expected.append(piece.split(spec.instruction_part)[0])
    assert tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "".join(expected)


def test_packed_samples_give_the_trained_model_the_same_logits(bundled):
    tokenizer, model = bundled
    dataset = datasets.Dataset.from_list([{"messages": c} for c in CONVERSATIONS])
    examples = train_on_responses_only(dataset, tokenizer).to_list()
    batch = DataCollatorForPackedSequences(attention="block_causal")(examples)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"]
        ).logits[0]
        start = 0
        for example in examples:
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            end = start + len(example["input_ids"])
            torch.testing.assert_close(packed[start:end], alone, atol=1e-4, rtol=1e-4)
            start = end
