import json
import math

import pytest
import torch
from safetensors.torch import load_file

from swiftune_export import lora_scale, merge_adapter


def _merged_tensors(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def test_merged_weights_equal_w_plus_scaled_ba(tmp_path, base_dir, adapter):
    adapter_dir, lora = adapter
    out = merge_adapter(adapter_dir, tmp_path / "merged")
    merged, base = _merged_tensors(out), load_file(str(base_dir / "model.safetensors"))
    assert merged.keys() == base.keys()
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        expected = weight.double()
        if f"base_model.model.{module}.lora_A.weight" in lora:
            a = lora[f"base_model.model.{module}.lora_A.weight"].double()
            b = lora[f"base_model.model.{module}.lora_B.weight"].double()
            expected = expected + (8 / 4) * b @ a
        assert merged[name].dtype == torch.bfloat16
        # The merge computes in float32 and rounds once to bf16: within half a bf16 step of the exact value.
        torch.testing.assert_close(merged[name].double(), expected.to(torch.bfloat16).double(), atol=0.05, rtol=8e-3)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_untouched_weights_are_copied_bit_for_bit(tmp_path, base_dir, adapter):
    out = merge_adapter(adapter[0], tmp_path / "merged")
    base = load_file(str(base_dir / "model.safetensors"))
    assert torch.equal(_merged_tensors(out)["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_small_shards_write_an_index_covering_every_tensor(tmp_path, base_dir, adapter):
    out = merge_adapter(adapter[0], tmp_path / "merged", max_shard_bytes=400)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert set(index["weight_map"]) == set(load_file(str(base_dir / "model.safetensors")))


def test_rslora_and_rank_pattern_scales():
    config = {"r": 16, "lora_alpha": 32, "use_rslora": True, "rank_pattern": {"q_proj": 4}}
    assert lora_scale(config, "model.layers.0.self_attn.q_proj") == 32 / math.sqrt(4)
    assert lora_scale(config, "model.layers.0.self_attn.v_proj") == 32 / math.sqrt(16)


def test_adapter_for_missing_module_leaves_no_output(tmp_path, base_dir, write_adapter):
    adapter_dir, _ = write_adapter(tmp_path / "bad", base_dir, ["model.layers.7.self_attn.q_proj"])
    with pytest.raises(ValueError, match="lacks"):
        merge_adapter(adapter_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


def test_output_path_that_is_a_file_is_refused(tmp_path, adapter):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match="existing file"):
        merge_adapter(adapter[0], target)
    assert target.read_text() == "keep me"


def test_non_empty_output_needs_overwrite(tmp_path, adapter):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        merge_adapter(adapter[0], tmp_path / "merged")
    out = merge_adapter(adapter[0], tmp_path / "merged", overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_missing_adapter_and_base_are_clear_errors(tmp_path, base_dir, adapter):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_adapter(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter folder"):
        merge_adapter(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="Base model folder"):
        merge_adapter(adapter[0], tmp_path / "out", base_dir=tmp_path / "nobase")


def test_pickle_only_base_is_refused(tmp_path, adapter):
    base = tmp_path / "pickled"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(FileNotFoundError, match="unpickling runs code"):
        merge_adapter(adapter[0], tmp_path / "out", base_dir=base)


def test_dora_adapters_are_refused(tmp_path, base_dir, write_adapter):
    adapter_dir, _ = write_adapter(tmp_path / "dora", base_dir, ["model.layers.0.self_attn.q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        merge_adapter(adapter_dir, tmp_path / "out")
