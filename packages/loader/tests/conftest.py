import pytest
import torch

from swiftune_loader.testing import build_tiny_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a ChatML tokenizer, saved once per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), build_chat_tokenizer())


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a shared two-core machine spinning threads cost seconds; the
    setting is put back after each module, so that other packages' tests run as they would alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
