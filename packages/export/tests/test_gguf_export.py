"""write_gguf read back by gguf's own reader: metadata, tensor names and types, data within each type's error."""

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from swiftune_export import write_gguf
from swiftune_export.gguf_mixes import choose_types
from swiftune_export.gguf_quant_types import QUANT_TYPES

Q = gguf.GGMLQuantizationType

# Relative RMS error allowed per stored type on these Gaussian weights: fp16 rounds to 11 bits (2**-11 relative, RMS
# below it); a b-bit block format spreads a block's range over 2**b - 1 levels, about 2.5 sigma / 2**b of RMS error
# for blocks of 32 Gaussian values; the measured values sit well under these.
TOLERANCE = {
    Q.F32: 0.0,
    Q.F16: 2**-11,
    Q.BF16: 2**-8,
    Q.Q8_0: 0.01,
    Q.Q6_K: 0.03,
    Q.Q5_1: 0.06,
    Q.Q5_0: 0.06,
    Q.Q5_K: 0.05,
    Q.Q4_1: 0.12,
    Q.Q4_0: 0.12,
    Q.Q4_K: 0.10,
}


def _field(reader, key):
    field = reader.fields[key]
    value = field.contents()
    return value


def _hf_rows_in_llama_cpp_order(weight, n_heads):
    """Independent statement of llama.cpp's layout: its row h*d + 2i + j holds Hugging Face row h*d + j*d/2 + i."""
    d = weight.shape[0] // n_heads
    order = [h * d + j * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for j in range(2)]
    return weight[order]


def _expected(hf, config):
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    out = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out[f"blk.{i}.attn_q.weight"] = _hf_rows_in_llama_cpp_order(hf[f"{p}.self_attn.q_proj.weight"], heads)
        out[f"blk.{i}.attn_k.weight"] = _hf_rows_in_llama_cpp_order(hf[f"{p}.self_attn.k_proj.weight"], kv)
        out[f"blk.{i}.attn_v.weight"] = hf[f"{p}.self_attn.v_proj.weight"]
        out[f"blk.{i}.attn_output.weight"] = hf[f"{p}.self_attn.o_proj.weight"]
        out[f"blk.{i}.ffn_gate.weight"] = hf[f"{p}.mlp.gate_proj.weight"]
        out[f"blk.{i}.ffn_up.weight"] = hf[f"{p}.mlp.up_proj.weight"]
        out[f"blk.{i}.ffn_down.weight"] = hf[f"{p}.mlp.down_proj.weight"]
        out[f"blk.{i}.attn_norm.weight"] = hf[f"{p}.input_layernorm.weight"]
        out[f"blk.{i}.ffn_norm.weight"] = hf[f"{p}.post_attention_layernorm.weight"]
    return {k: v.to(torch.float32).numpy() for k, v in out.items()}


@pytest.mark.parametrize("quant", sorted(QUANT_TYPES))
def test_tensors_read_back_within_tolerance(llama_dir, tmp_path, quant):
    """Every recipe: each tensor in the type the recipe gives it (llama.cpp's choice, see test_gguf_mixes), and its
    values, read back by gguf's dequantizer, within that type's error of the q/k-reordered original."""
    config = json.loads((llama_dir / "config.json").read_text())
    out = write_gguf(llama_dir, tmp_path / f"model-{quant}.gguf", quant=quant)
    reader = gguf.GGUFReader(out)
    expected = _expected(load_file(str(llama_dir / "model.safetensors")), config)
    assert {t.name for t in reader.tensors} == set(expected)
    types = choose_types([(name, value.shape) for name, value in expected.items()], QUANT_TYPES[quant], 2)
    stored = set()
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected[tensor.name].shape)
        want = expected[tensor.name]
        assert tensor.tensor_type == types[tensor.name], tensor.name
        stored.add(tensor.tensor_type)
        if want.ndim == 1:
            assert tensor.tensor_type == Q.F32
            np.testing.assert_array_equal(values, want)
            continue
        error = np.sqrt(np.mean((values - want) ** 2) / np.mean(want**2))
        assert error <= TOLERANCE[tensor.tensor_type], (tensor.name, error)
    assert QUANT_TYPES[quant].qtype in stored  # the recipe's main type is used, not only its exceptions
    assert _field(reader, "general.file_type") == int(QUANT_TYPES[quant].file_type)


def test_metadata(llama_dir, tmp_path):
    reader = gguf.GGUFReader(write_gguf(llama_dir, tmp_path / "m.gguf", quant="q8_0"))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.embedding_length") == 256
    assert _field(reader, "llama.feed_forward_length") == 512
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.rope.dimension_count") == 64
    assert _field(reader, "llama.context_length") == 512
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert _field(reader, "llama.vocab_size") == 270
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 270
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[:3] == [3, 3, 3]
    assert tokens[3 + ord("!")] == "!" and types[3] == 1 and tokens[259] == "he"
    assert tokens[-1] == "[PAD269]" and types[-1] == int(gguf.TokenType.UNUSED)  # embedding rows past the tokenizer
    assert _field(reader, "tokenizer.ggml.merges") == ["h e", "he l", "Ġ t"]
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 0
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.chat_template").startswith("{% for m in messages %}")


def test_bad_inputs_say_what_to_do(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="choose one of"):
        write_gguf(llama_dir, tmp_path / "a.gguf", quant="q3_k_xl")
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps(dict(config, model_type="gpt_neox")))
    with pytest.raises(ValueError, match="convert_hf_to_gguf"):
        write_gguf(llama_dir, tmp_path / "a.gguf")
    (llama_dir / "config.json").write_text(json.dumps(config))
    (llama_dir / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        write_gguf(llama_dir, tmp_path / "a.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".a.gguf*"))


def test_write_is_atomic(llama_dir, tmp_path, monkeypatch):
    """A failure while the data is written leaves neither the file nor a partial one; an existing file is kept."""
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")

    def failing(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("swiftune_export.gguf_export._write_data", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(llama_dir, target, overwrite=True)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "m.gguf"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_gguf(llama_dir, target)


def test_tokenizers_llama_cpp_would_split_differently_are_refused(llama_dir, tmp_path):
    data = json.loads((llama_dir / "tokenizer.json").read_text())
    split = {"type": "Split", "pattern": {"Regex": r"\w+|\s"}, "behavior": "Isolated", "invert": False}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel", "use_regex": False}]}
    (llama_dir / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="split text differently"):
        write_gguf(llama_dir, tmp_path / "a.gguf")
    data["model"]["byte_fallback"] = True  # a sentencepiece-style BPE (Llama 2, Mistral v0.1)
    (llama_dir / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="sentencepiece"):
        write_gguf(llama_dir, tmp_path / "a.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_more_tokens_than_embedding_rows_is_refused(llama_dir, tmp_path):
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps(dict(config, vocab_size=100)))
    with pytest.raises(ValueError, match="resize the model's embeddings"):
        write_gguf(llama_dir, tmp_path / "a.gguf")
