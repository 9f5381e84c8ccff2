"""A folder written through staged_folder appears complete or not at all."""

import pytest

from swiftune_loader.staged_folder import staged_folder


def test_a_finished_block_replaces_the_target_and_a_failed_one_leaves_it(tmp_path):
    target = tmp_path / "nested" / "adapter"
    with staged_folder(target) as staging:
        (staging / "weights.safetensors").write_text("new")
        assert not target.exists()  # nothing under the target's name until the block finishes
    assert (target / "weights.safetensors").read_text() == "new"

    with pytest.raises(RuntimeError, match="disk"):
        with staged_folder(target) as staging:
            (staging / "weights.safetensors").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "weights.safetensors").read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"]  # no staging folder left behind
