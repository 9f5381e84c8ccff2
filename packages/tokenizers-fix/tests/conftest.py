import logging

import pytest


@pytest.fixture
def repair_log(caplog):
    """Lines the package logged, so that a test can check that a repair logged exactly one line."""
    caplog.set_level(logging.WARNING, logger="swiftune_tokenizers_fix")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "swiftune_tokenizers_fix"]

    return lines
