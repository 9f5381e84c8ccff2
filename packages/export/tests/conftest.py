"""Base models and adapters written by hand: the export package reads files, so tests write the files."""

import json

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture
def base_dir(tmp_path):
    """A 'model' folder: two layers of q_proj and v_proj weights in bf16, an embedding, config and tokenizer files."""
    torch.manual_seed(0)
    folder = tmp_path / "base"
    folder.mkdir()
    tensors = {"model.embed_tokens.weight": torch.randn(50, 8, dtype=torch.bfloat16)}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            tensors[f"model.layers.{layer}.self_attn.{proj}.weight"] = torch.randn(12, 8, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _write_adapter(folder, base_dir, modules, r=4, alpha=8, **config):
    """Write a peft-style LoRA adapter for ``modules`` (base weight names without '.weight')."""
    folder.mkdir(parents=True)
    tensors = {}
    for module in modules:
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, 8)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(12, r)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    settings = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "base_model_name_or_path": str(base_dir)}
    settings.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder, tensors


@pytest.fixture
def adapter(tmp_path, base_dir):
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    return _write_adapter(tmp_path / "adapter", base_dir, modules)


@pytest.fixture
def write_adapter():
    """The adapter writer, for tests that need an adapter of their own."""
    return _write_adapter


def _byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (the alphabet of byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    spelled, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelled[byte] = chr(byte)
        else:
            spelled[byte] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


LLAMA_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "vocab_size": 270,
    "tie_word_embeddings": False,
}


def write_llama_folder(folder, seed=0, **overrides):
    """A hand-written Llama folder (config.json, model.safetensors, tokenizer files) with LLAMA_CONFIG's fields
    changed by ``overrides``; 2-D weights in bf16, norms in float32 away from 1, no lm_head when tied."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    c = dict(LLAMA_CONFIG, **overrides)
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv_rows = c["num_key_value_heads"] * hidden // c["num_attention_heads"]
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden), "model.norm.weight": 1 + torch.rand(hidden)}
    if not c["tie_word_embeddings"]:
        tensors["lm_head.weight"] = torch.randn(vocab, hidden) * 0.05
    for i in range(c["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        shapes = {
            "self_attn.q_proj": (hidden, hidden),
            "self_attn.k_proj": (kv_rows, hidden),
            "self_attn.v_proj": (kv_rows, hidden),
            "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inter, hidden),
            "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter),
        }
        for name, shape in shapes.items():
            tensors[f"{prefix}.{name}.weight"] = (torch.randn(shape) * 0.05).to(torch.bfloat16)
        tensors[f"{prefix}.input_layernorm.weight"] = 1 + torch.rand(hidden)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = 1 + torch.rand(hidden)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(c))
    _write_byte_level_tokenizer(folder)
    return folder


@pytest.fixture
def llama_dir(tmp_path):
    """A hand-written Llama folder whose rows are multiples of 256 (so every quant type applies), with a byte-level
    BPE tokenizer.json of 3 special tokens, 256 bytes and 3 merges, in fewer ids than the 270 embedding rows."""
    return write_llama_folder(tmp_path / "llama")


@pytest.fixture(scope="session")
def llama_folder_writer():
    """``write_llama_folder`` itself, for module-scoped fixtures."""
    return write_llama_folder


@pytest.fixture
def make_llama_dir(tmp_path):
    """The folder writer, for tests that need other shapes: ``make_llama_dir(name, **config_overrides)``."""
    return lambda name, **overrides: write_llama_folder(tmp_path / name, **overrides)


def _write_byte_level_tokenizer(folder):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab_map = {token: i for i, token in enumerate(specials + _byte_alphabet())}
    merges = [["h", "e"], ["he", "l"], ["Ġ", "t"]]
    for left, right in merges:
        vocab_map[left + right] = len(vocab_map)
    tokenizer = {
        "version": "1.0",
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab_map,
            "merges": merges,
        },
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    )
    (folder / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}")
