import pytest

from swiftune_loader.testing import build_tiny_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a ChatML tokenizer, saved once per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), build_chat_tokenizer())
