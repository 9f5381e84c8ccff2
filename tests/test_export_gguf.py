"""GGUF files written by swiftune_export, read by an independent reader: transformers' gguf_file loader.

F32 must give the safetensors model's logits exactly. Every other type is checked against its own arithmetic: the
weights transformers dequantizes (with its own kernels) must equal gguf's dequantize of the same bytes, and the model
built from them must give the logits of the safetensors model whose 2-D weights are rounded the same way. The F16
bound: fp16 keeps 11 significant bits, so each weight moves by at most 2**-11 relative; through the 2 * layers + 1
matmuls of the residual stream plus the lm_head, first order, the logits move by at most about
2**-11 * (2 * layers + 2) relative; the test allows 4 times that.
"""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

from swiftune_export import write_gguf
from swiftune_export.gguf_architectures import architecture_for, gguf_tensor_name
from swiftune_export.gguf_quant_types import quant_type, quantize
from swiftune_tokenizers_fix.testing import build_chat_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "  Quillhaven, 1742!  ",
]


def _save(tmp_path, config_class, hidden=32, heads=4, kv_heads=2, tie=False, **extra):
    tokenizer = build_chat_tokenizer()
    ids = {f"{r}_token_id": getattr(tokenizer, f"{r}_token_id") for r in ("bos", "eos", "pad")}
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        **ids,
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from 1 so that a swapped or missing norm shows
        for param in model.parameters():
            if param.ndim == 1:
                param.copy_(1 + 0.5 * torch.rand_like(param))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, AutoTokenizer.from_pretrained(folder)


def _load(gguf_path):
    # The GGUF alone in its folder: nothing can come from the safetensors folder.
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval()


def _logits(model, tokenizer):
    batch = tokenizer(TEXTS[1], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _rounded_like_gguf(model, path):
    """The safetensors model with every 2-D weight passed through the type the GGUF file stores it in and back (1-D
    tensors stay F32)."""
    config = model.config.to_dict()
    architecture = architecture_for(config)
    name_map = gguf.get_tensor_name_map(architecture.arch, config["num_hidden_layers"])
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    rounded = {}
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        stored = types.get(gguf_tensor_name(name_map, name, architecture))
        if array.ndim == 2 and stored is not None:
            array = gguf.quants.dequantize(quantize(array, stored), stored).reshape(array.shape)
        rounded[name] = torch.from_numpy(np.ascontiguousarray(array))
    return rounded


@pytest.mark.parametrize(
    "config_class,tie", [(LlamaConfig, False), (MistralConfig, False), (Qwen2Config, False), (Qwen2Config, True)]
)
def test_f32_is_bit_exact(tmp_path, config_class, tie):
    """Qwen2 also tied, as its small models are: the GGUF then has no output.weight and readers reuse token_embd."""
    folder, model, tokenizer = _save(tmp_path, config_class, tie=tie)
    loaded = _load(write_gguf(folder, tmp_path / "gguf" / "model-f32.gguf", quant="f32"))
    assert torch.equal(_logits(loaded, tokenizer), _logits(model, tokenizer))


def test_f16_within_derived_bound(tmp_path):
    folder, model, tokenizer = _save(tmp_path, LlamaConfig)
    path = write_gguf(folder, tmp_path / "gguf" / "model-f16.gguf", quant="f16")
    loaded = _load(path)
    got, want = _logits(loaded, tokenizer), _logits(model, tokenizer)
    bound = 4 * 2**-11 * (2 * 2 + 2)
    assert ((got - want).norm() / want.norm()).item() < bound
    reference = AutoModelForCausalLM.from_config(model.config).eval()
    reference.load_state_dict(_rounded_like_gguf(model, path))
    torch.testing.assert_close(got, _logits(reference, tokenizer), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m", "q5_k_m", "q6_k"])
def test_quantized_weights_agree_with_transformers_dequantizer(tmp_path, quant):
    """Hidden size 256 so that every weight takes the K-quant (rows of 256): transformers' own K-quant kernels must
    read our bytes as gguf's dequantize does, for the q/k permutation as for the plain weights, in every type the
    recipe mixes (Q6_K for attn_v, ffn_down and the output in the _M recipes)."""
    folder, model, tokenizer = _save(tmp_path, LlamaConfig, hidden=256, heads=4, kv_heads=2)
    path = write_gguf(folder, tmp_path / "gguf" / f"model-{quant}.gguf", quant=quant)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == quant_type(quant).qtype
    loaded = _load(path)
    expected = _rounded_like_gguf(model, path)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor.float(), expected[name], rtol=0, atol=1e-6, msg=name)
    got, want = _logits(loaded, tokenizer), _logits(model, tokenizer)
    relative = ((got - want).norm() / want.norm()).item()
    print(f"{quant}: logits relative error {relative:.4f}")
    # Random weights at init scale make the logits small and noise-dominated: these are loose sanity bounds, the
    # proof is the weight equality above.
    assert relative < {"q8_0": 0.05, "q6_k": 0.1, "q5_k_m": 0.2, "q4_k_m": 0.4}[quant]


def test_tokenizer_read_back_from_gguf(tmp_path):
    folder, _, tokenizer = _save(tmp_path, LlamaConfig)
    path = write_gguf(folder, tmp_path / "gguf" / "model.gguf", quant="q8_0")
    read = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert read(text).input_ids == tokenizer(text).input_ids, text
        assert read.decode(read(text).input_ids) == text
    assert read.chat_template == tokenizer.chat_template
    assert (read.bos_token, read.eos_token, read.pad_token) == (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
    )
    messages = [{"role": "user", "content": "hello"}]
    assert read.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


def test_rope_theta_and_llama3_scaling(tmp_path):
    """transformers 5 keeps rope_theta inside rope_parameters; Llama-3.1 scaling becomes llama.cpp's rope_freqs, whose
    divisors must turn transformers' unscaled inverse frequencies into its scaled ones."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from swiftune_export.gguf_rope import llama3_rope_factors

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling["original_max_position_embeddings"] = 64
    folder, model, _ = _save(tmp_path, LlamaConfig, hidden=64, rope_theta=500000.0, rope_scaling=scaling)
    config = model.config
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    factors = llama3_rope_factors(config.to_dict())
    torch.testing.assert_close(plain / torch.from_numpy(factors), scaled.float(), rtol=1e-5, atol=0)
    assert 1.0 < factors.max() <= 8.0 and factors.min() == 1.0  # the test covers kept, divided and smoothed ones
    reader = gguf.GGUFReader(write_gguf(folder, tmp_path / "g" / "m.gguf", quant="f32"))
    assert reader.fields["llama.rope.freq_base"].contents() == 500000.0
    rope = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    np.testing.assert_array_equal(rope.data, factors)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_split_regex_tokenizers_read_back(tmp_path, pre):
    """Llama-3 and Qwen2 tokenizers split text with a regex before BPE; the GGUF names it and a reader must split alike
    (they differ on digits: groups of up to three versus single digits)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from swiftune_export.gguf_tokenizer import _PRE_TOKENIZER_REGEXES

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRE_TOKENIZER_REGEXES[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["In 1742 the 12345 islanders didn't leave; they'll stay.", "Quillhaven's 2026 census: 987654 fish."]
    backend.train_from_iterator(corpus * 8, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    folder = tmp_path / "model"
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    path = write_gguf(folder, tmp_path / "g" / "m.gguf", quant="f16")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    read = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in corpus + ["I'd pay 1234567 for it!\n\n  ok"]:
        assert read(text).input_ids == tokenizer(text).input_ids, text
