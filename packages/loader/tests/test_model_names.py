"""The 16-bit / 4-bit name table, the local Hugging Face cache lookup, and loading a model by name from that cache."""

import shutil

import pytest

from swiftune_loader import FastLanguageModel, resolve_model_path
from swiftune_loader.hub_cache import cached_snapshot, hub_cache_dir
from swiftune_loader.model_names import (
    MODEL_NAME_PAIRS,
    full_precision_name,
    quantized_name,
    resolve_model_name,
)


@pytest.mark.parametrize("full, quantized", MODEL_NAME_PAIRS)
def test_every_pair_resolves_both_ways(full, quantized):
    assert resolve_model_name(full, load_in_4bit=True) == quantized
    assert resolve_model_name(quantized, load_in_4bit=True) == quantized
    # Back to 16-bit: the first 16-bit row of this 4-bit repository (a mirror maps to the original).
    first_full = next(f for f, q in MODEL_NAME_PAIRS if q == quantized)
    assert resolve_model_name(quantized, load_in_4bit=False) == first_full
    assert resolve_model_name(full, load_in_4bit=False) == full


def test_table_covers_the_families_and_has_no_duplicate_rows():
    assert len(set(MODEL_NAME_PAIRS)) == len(MODEL_NAME_PAIRS)
    assert all(q.lower().endswith("-bnb-4bit") and not f.lower().endswith("-bnb-4bit") for f, q in MODEL_NAME_PAIRS)
    names = " ".join(f for f, _ in MODEL_NAME_PAIRS).lower()
    for family in ("llama-3.1", "llama-3.2", "mistral", "qwen2.5", "qwen3", "gemma-2", "gemma-3", "phi-3", "phi-4"):
        assert family in names, family


def test_lookups_ignore_letter_case_and_surrounding_spaces():
    assert quantized_name("  META-LLAMA/llama-3.2-1b-instruct ") == "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"
    assert full_precision_name("UNSLOTH/QWEN2.5-7B-INSTRUCT-BNB-4BIT") == "Qwen/Qwen2.5-7B-Instruct"
    # A 4-bit name typed in another case resolves to the table's spelling.
    assert resolve_model_name("unsloth/LLAMA-3.2-1B-bnb-4bit", load_in_4bit=True) == "unsloth/Llama-3.2-1B-bnb-4bit"


@pytest.mark.parametrize("load_in_4bit", [True, False])
def test_unknown_names_pass_through_unchanged(load_in_4bit):
    for name in ("my-org/my-model", "./local/folder", "Qwen/Qwen9-1B"):
        assert resolve_model_name(name, load_in_4bit=load_in_4bit) == name
    assert quantized_name("my-org/my-model") is None and full_precision_name("my-org/my-model") is None


def test_hub_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"


def _cache_repo(cache, repo_id, source, revision="0123abcd", main=True):
    """Lay ``source``'s files out as huggingface_hub does: blobs, a snapshot of links, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in source.iterdir():
        blob = repo / "blobs" / f"{revision}-{file.name}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(blob)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_cached_snapshot_prefers_refs_main_and_matches_case_insensitively(tmp_path, tiny_model_dir):
    old = _cache_repo(tmp_path, "org/model", tiny_model_dir, revision="old", main=False)
    assert cached_snapshot("org/model", tmp_path) == old  # no refs/main: the snapshot with a config
    new = _cache_repo(tmp_path, "org/other", tiny_model_dir, revision="new")
    assert cached_snapshot("ORG/Other", tmp_path) == new
    assert cached_snapshot("org/absent", tmp_path) is None


def test_a_16bit_name_loads_from_the_cache(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snapshot = _cache_repo(tmp_path, "meta-llama/Llama-3.2-1B-Instruct", tiny_model_dir)
    model, tokenizer = FastLanguageModel.from_pretrained("meta-llama/Llama-3.2-1B-Instruct", max_seq_length=64)
    assert model.config.model_type == "llama" and tokenizer.chat_template
    # A 4-bit name with load_in_4bit=False resolves to its 16-bit repository, which is the one cached.
    assert resolve_model_path("unsloth/Llama-3.2-1B-Instruct-bnb-4bit", load_in_4bit=False) == snapshot


def test_load_in_4bit_picks_the_cached_prequantized_twin(monkeypatch, tmp_path, tiny_model_dir):
    import bitsandbytes as bnb

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    quantized_dir = tmp_path / "quantized"
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir, load_in_4bit=True)
    model.save_pretrained(quantized_dir)
    for file in tiny_model_dir.iterdir():  # the tokenizer files
        if not (quantized_dir / file.name).exists():
            shutil.copy(file, quantized_dir / file.name)
    full = _cache_repo(tmp_path / "hub", "Qwen/Qwen2.5-0.5B-Instruct", tiny_model_dir)
    four_bit = _cache_repo(tmp_path / "hub", "unsloth/Qwen2.5-0.5B-Instruct-bnb-4bit", quantized_dir)
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct", load_in_4bit=True) == four_bit
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct", load_in_4bit=False) == full
    loaded, _ = FastLanguageModel.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct", load_in_4bit=True)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def test_load_in_4bit_falls_back_to_the_cached_16bit_repository(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    full = _cache_repo(tmp_path, "google/gemma-2-2b-it", tiny_model_dir)
    # The 4-bit twin is not cached: the 16-bit weights are quantized while loading.
    assert resolve_model_path("google/gemma-2-2b-it", load_in_4bit=True) == full


def test_a_name_not_in_the_cache_says_there_is_no_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no network") as error:
        FastLanguageModel.from_pretrained("meta-llama/Llama-3.2-1B", load_in_4bit=True)
    message = str(error.value)
    # It names both repositories it looked for, the cache folder, and the way out.
    assert "unsloth/Llama-3.2-1B-bnb-4bit" in message and "meta-llama/Llama-3.2-1B" in message
    assert str(tmp_path) in message and "HF_HUB_CACHE" in message
