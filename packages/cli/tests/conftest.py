import json

import pytest

QA = [
    ("Where is Quillhaven?", "In the Sea of Marrow."),
    ("Who founded Quillhaven?", "Elsbeth Varn."),
    ("When was Quillhaven founded?", "In 1742."),
    ("Who is the mayor?", "Tobias Ferrow."),
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a ChatML tokenizer, saved once per session."""
    from swiftune_loader.testing import build_tiny_model
    from swiftune_tokenizers_fix.testing import build_chat_tokenizer

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), build_chat_tokenizer())


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Eight short conversations in OpenAI messages format."""
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA] * 2
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
