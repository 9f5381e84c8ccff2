import json

import pytest

from swiftune_tokenizers_fix.testing import build_chat_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_chat_tokenizer()


@pytest.fixture
def write_jsonl(tmp_path):
    """Write rows to a .jsonl file in the test's folder and return its path."""

    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    return write
