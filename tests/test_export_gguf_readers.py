"""Every exported GGUF read by independent readers: llama.cpp (llama-cpp-python) must compute the transformers
model's logits, and transformers' own gguf_file loader must rebuild the model.

One tiny model per architecture of the fast path (plus Cohere), hidden size 256 so that every K-quant applies.

The bound on llama.cpp's logits, derived. The reference is the transformers model whose 2-D weights are rounded
exactly as the file stores them (each through its GGUF type and back), so that what remains is llama.cpp's own
arithmetic: its CPU matmuls round what they read besides the weights — the activations to the weight's dot type
(F16 for F16 weights, BF16 for BF16, 8-bit blocks Q8_0/Q8_1/Q8_K for the quantized types, whose RMS rounding is
about step / sqrt(12) = max / (127 sqrt(12)), under 2**-7 of the RMS for Gaussian-like blocks) and the K/V cache to
F16 (2**-11, which is all there is for F32 weights). With u that relative rounding, a layer rounds 4 matmul inputs
(q/k/v, o, gate/up, down) and the head one more; independent roundings add in quadrature, so the logits move by
about u * sqrt(4 * layers + 1) relative. The tests allow 4 times that. Against the unrounded model the bound grows
by the rounding's own effect (triangle inequality), measured on the rounded transformers model.
"""

import dataclasses
import math

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from swiftune_export import write_gguf
from swiftune_export.gguf_architectures import ARCHITECTURES, architecture_for, gguf_tensor_name
from swiftune_export.gguf_quant_types import QUANT_TYPES, quantize
from swiftune_tokenizers_fix.testing import build_chat_tokenizer

Q = gguf.GGMLQuantizationType
LAYERS = 2
PROMPT = "<|im_start|>user\nWhat is the capital of France? Quillhaven, 1742!<|im_end|>\n<|im_start|>assistant\n"
# Settings that make each architecture's particulars matter: soft-caps that bite, a sliding window shorter than the
# prompt, scales away from 1. Head sizes are transformers' defaults where its GGUF loader assumes them (it does not
# read the key length): Qwen3 128, Gemma 2/3 256.
ARCHS = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128),
    "gemma": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "gemma2": dict(
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        sliding_window=8,
    ),
    "gemma3_text": dict(
        num_attention_heads=1, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=8
    ),
    "phi3": dict(num_attention_heads=4, num_key_value_heads=2),
    "cohere": dict(num_attention_heads=4, num_key_value_heads=2, logit_scale=0.5),
    "granite": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.1,
        logits_scaling=4.0,
    ),
}
# Architectures transformers' GGUF loader reads (it has no Gemma 1, Cohere or Granite, and rebuilds Gemma 2 with its
# default soft-caps, as it reads neither soft-cap key).
TRANSFORMERS_READS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")


def activation_rounding(quant: str) -> float:
    qtype = QUANT_TYPES[quant].qtype
    return {Q.F32: 2**-11, Q.F16: 2**-11, Q.BF16: 2**-8}.get(qtype, 2**-7)


def llama_cpp_bound(quant: str) -> float:
    return 4 * activation_rounding(quant) * math.sqrt(4 * LAYERS + 1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_chat_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    """tiny(model_type) -> (folder, float32 model); built once per architecture."""
    built = {}

    def build(model_type):
        if model_type not in built:
            ids = {f"{r}_token_id": getattr(tokenizer, f"{r}_token_id") for r in ("bos", "eos", "pad")}
            config = AutoConfig.for_model(
                model_type,
                vocab_size=len(tokenizer),
                hidden_size=256,
                intermediate_size=512,
                num_hidden_layers=LAYERS,
                max_position_embeddings=512,
                initializer_range=0.1,  # attention far from uniform, so that q/k layout matters
                **ids,
                **ARCHS[model_type],
            )
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).eval()
            offset = 0.0 if ARCHITECTURES[model_type].norm_offset else 0.75  # Gemma norms hold w of (1 + w)
            with torch.no_grad():  # norms and biases away from their init so that a lost one shows
                for name, param in model.named_parameters():
                    if param.ndim == 1:
                        param.copy_(0.5 * torch.rand_like(param) + (offset if "norm" in name else 0.0))
            folder = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            built[model_type] = folder, model
        return built[model_type]

    return build


def _ids(tokenizer):
    return tokenizer(PROMPT).input_ids


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _llama_cpp_logits(path, ids, tokenizer):
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    try:
        assert llm.tokenize(PROMPT.encode(), add_bos=False, special=True) == ids  # llama.cpp tokenizes alike
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def _rounded_like_file(model, path):
    """The model with each 2-D weight passed through the type the GGUF file stores it in."""
    config = model.config.to_dict()
    architecture = architecture_for(config)
    name_map = gguf.get_tensor_name_map(architecture.arch, LAYERS)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    state = {}
    for name, tensor in model.state_dict().items():
        gguf_name = gguf_tensor_name(name_map, name, architecture)
        if tensor.ndim == 2 and gguf_name in types:
            array, qtype = tensor.float().numpy(), types[gguf_name]
            tensor = torch.from_numpy(gguf.quants.dequantize(quantize(array, qtype), qtype).reshape(array.shape).copy())
        state[name] = tensor
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    rounded = AutoModelForCausalLM.from_config(model.config).eval()
    rounded.load_state_dict(state)
    return rounded


def _relative(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


CASES = [(arch, quant) for arch in ARCHS for quant in ("f32", "q4_k_m")]
CASES += [("llama", quant) for quant in sorted(QUANT_TYPES) if quant not in ("f32", "q4_k_m")]


@pytest.mark.parametrize("model_type,quant", CASES)
def test_llama_cpp_computes_the_models_logits(tiny, tokenizer, tmp_path, model_type, quant):
    folder, model = tiny(model_type)
    path = write_gguf(folder, tmp_path / f"{model_type}-{quant}.gguf", quant=quant)
    ids = _ids(tokenizer)
    got = _llama_cpp_logits(path, ids, tokenizer)
    rounded, original = _logits(_rounded_like_file(model, path), ids), _logits(model, ids)
    error, rounding = _relative(got, rounded), _relative(rounded, original)
    print(f"{model_type} {quant}: vs rounded {error:.2e}, vs original {_relative(got, original):.2e}")
    assert error < llama_cpp_bound(quant)
    assert _relative(got, original) < rounding + llama_cpp_bound(quant)


@pytest.mark.parametrize("model_type,field,planted", [("llama", "permute_qk", False), ("gemma", "norm_offset", 0.0)])
def test_a_planted_mistake_fails_the_check(tiny, tokenizer, tmp_path, monkeypatch, model_type, field, planted):
    """The q/k rows left in Hugging Face's order (or Gemma's norms without their + 1): llama.cpp's logits leave the
    bound by far, so the check above would catch such an export."""
    folder, model = tiny(model_type)
    monkeypatch.setitem(ARCHITECTURES, model_type, dataclasses.replace(ARCHITECTURES[model_type], **{field: planted}))
    path = write_gguf(folder, tmp_path / "planted.gguf", quant="f32")
    ids = _ids(tokenizer)
    error = _relative(_llama_cpp_logits(path, ids, tokenizer), _logits(model, ids))
    print(f"planted {field}={planted}: relative error {error:.2f}")
    assert error > 10 * llama_cpp_bound("f32")


@pytest.mark.parametrize("model_type", TRANSFORMERS_READS)
def test_transformers_gguf_loader_rebuilds_the_model(tiny, tokenizer, tmp_path, model_type):
    """F32 gives the model back exactly; F16 gives the model with fp16-rounded weights (to float32 rounding), and
    the logits stay within fp16's effect: 2**-11 relative per weight through 2 * layers + 2 matmuls, 4 times."""
    folder, model = tiny(model_type)
    ids = torch.tensor([_ids(tokenizer)])
    for quant in ("f32", "f16"):
        path = write_gguf(folder, tmp_path / quant / f"model-{quant}.gguf", quant=quant)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        got, want = _logits(loaded, ids[0].tolist()), _logits(model, ids[0].tolist())
        if quant == "f32":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, _logits(_rounded_like_file(model, path), ids[0].tolist()), atol=1e-5)
            assert _relative(got, want) < 4 * 2**-11 * (2 * LAYERS + 2)
