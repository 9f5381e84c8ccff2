import json

import pytest

import swiftune_loader.model_path as model_path
from swiftune_loader import resolve_model_path


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "nope")


def test_hub_id_not_in_the_cache_gets_a_no_download_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve_model_path("meta-llama/Llama-3.2-1B")


@pytest.mark.parametrize("name", ["./models/absent", "/no/such/model", "~/absent-model"])
def test_local_looking_path_that_does_not_exist_is_not_taken_for_a_hub_id(name):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(name)


def test_file_instead_of_folder_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file"):
        resolve_model_path(path)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(tmp_path)


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="no weight files"):
        resolve_model_path(tmp_path)


def test_model_folder_is_returned(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == tiny_model_dir


@pytest.mark.parametrize("name", [None, "default", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_default_names_resolve_to_the_bundled_model(monkeypatch, tmp_path, name):
    monkeypatch.setattr(model_path, "default_model_path", lambda: tmp_path)
    assert resolve_model_path(name) == tmp_path
