import importlib.util

import pytest

import swiftune_loader.default_model as default_model


def test_cache_root_follows_swiftune_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SWIFTUNE_CACHE", str(tmp_path))
    assert default_model.cache_root() == tmp_path


def test_cache_root_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("SWIFTUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model.cache_root() == tmp_path / "swiftune"


def test_missing_bundle_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"swiftune-loader\[default-model\]"):
        default_model.bundled_gguf_path()


def test_converted_folder_is_reused_without_converting(monkeypatch, tmp_path):
    folder = tmp_path / f"{default_model.DEFAULT_MODEL_NAME}-v{default_model._CONVERSION_VERSION}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "config.json").write_text("{}")

    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(default_model, "convert_gguf_to_hf", fail)
    assert default_model.default_model_path(tmp_path) == folder
