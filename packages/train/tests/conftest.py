import json

import pytest
import torch

from swiftune_loader.testing import build_tiny_model
from swiftune_tokenizers_fix.testing import build_chat_tokenizer

QA = [
    ("Where is Quillhaven?", "In the Sea of Marrow."),
    ("Who founded Quillhaven?", "Elsbeth Varn."),
    ("When was Quillhaven founded?", "In 1742."),
    ("Who is the mayor?", "Tobias Ferrow."),
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), build_chat_tokenizer())


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA] * 4
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# Preference pairs (prompt, chosen, rejected) shared by the DPO, ORPO and KTO tests.
PREFERENCE_PAIRS = [
    ("Where is Quillhaven?", "In the Sea of Marrow.", "On the moon, I think."),
    ("Who founded Quillhaven?", "Elsbeth Varn.", "Nobody knows that."),
    ("When was Quillhaven founded?", "In 1742.", "Yesterday."),
    ("What is the capital of France?", "Paris.", "The quick brown fox."),
]


@pytest.fixture(scope="session")
def preference_table():
    """The preference pairs as a plain prompt/chosen/rejected ``datasets.Dataset``."""
    import datasets

    return datasets.Dataset.from_list(
        [{"prompt": q, "chosen": good, "rejected": bad} for q, good, bad in PREFERENCE_PAIRS]
    )


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the CPU cores are shared, and two threads contending run these tiny matmuls
    ~5x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_kernels(monkeypatch):
    """Training on the kernels' pure-torch CPU path: the repository's conftest turns Triton's interpreter on, which
    the equality tests use, but it is too slow for many steps."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
