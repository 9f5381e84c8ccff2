"""Per-tensor types of each recipe: the rules stated by hand, and the whole table against llama.cpp's own quantizer.

llama-cpp-python exposes llama.cpp's ``llama_model_quantize`` (what the ``llama-quantize`` tool runs): it requantizes
our F32 file to each recipe, and the type it gives every tensor must be the type our writer gave it.
"""

import ctypes

import gguf
import llama_cpp
import numpy as np
import pytest

from swiftune_export import write_gguf
from swiftune_export.gguf_mixes import choose_types, use_more_bits
from swiftune_export.gguf_quant_types import QUANT_TYPES, quant_type

Q = gguf.GGMLQuantizationType


def _layer_tensors(layers, columns=256, down_columns=256, qkv=False):
    tensors = [
        ("token_embd.weight", (300, columns)),
        ("output_norm.weight", (columns,)),
        ("output.weight", (300, columns)),
    ]
    for i in range(layers):
        names = ["attn_qkv"] if qkv else ["attn_q", "attn_k", "attn_v"]
        tensors += [(f"blk.{i}.{n}.weight", (columns, columns)) for n in names + ["attn_output", "ffn_gate", "ffn_up"]]
        tensors += [(f"blk.{i}.ffn_down.weight", (columns, down_columns)), (f"blk.{i}.attn_norm.weight", (columns,))]
    return tensors


def test_use_more_bits_for_32_layers():
    # By hand from the rule: the first and last eighth (0-3, 28-31) and, between, every third from layer 4 + 2.
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_q4_k_m_rules():
    types = choose_types(_layer_tensors(32), quant_type("q4_k_m"), 32)
    more = [i for i in range(32) if use_more_bits(i, 32)]
    for i in range(32):
        for name in ("attn_v", "ffn_down"):
            assert types[f"blk.{i}.{name}.weight"] == (Q.Q6_K if i in more else Q.Q4_K), (i, name)
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == Q.Q4_K
        assert types[f"blk.{i}.attn_norm.weight"] == Q.F32
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K


def test_tied_embedding_takes_the_output_type_and_fused_qkv_the_value_type():
    tensors = [t for t in _layer_tensors(8, qkv=True) if t[0] != "output.weight"]
    types = choose_types(tensors, quant_type("q5_k_m"), 8)
    assert types["token_embd.weight"] == Q.Q6_K
    assert types["blk.0.attn_qkv.weight"] == Q.Q6_K and types["blk.1.attn_qkv.weight"] == Q.Q5_K


def test_rows_that_do_not_fill_blocks_fall_back_as_llama_cpp_does():
    types = choose_types(_layer_tensors(8, columns=576, down_columns=100), quant_type("q4_k_m"), 8)
    assert types["blk.1.attn_q.weight"] == Q.Q5_0  # Q4_K -> Q5_0 (576 = 18 blocks of 32)
    assert types["blk.0.attn_v.weight"] == Q.Q8_0  # Q6_K -> Q8_0
    assert types["output.weight"] == Q.Q8_0  # the output's own rule for rows that are not 256-blocks
    assert types["blk.1.ffn_down.weight"] == Q.F16  # 100 columns fit no block type
    assert choose_types(_layer_tensors(1, columns=576), quant_type("q5_k_s"), 1)["blk.0.attn_q.weight"] == Q.Q5_1


def test_float_recipes_and_q8_0_keep_one_type():
    for name, qtype in (("f16", Q.F16), ("bf16", Q.BF16), ("q8_0", Q.Q8_0)):
        types = choose_types(_layer_tensors(4), quant_type(name), 4)
        assert {types[n] for n, shape in _layer_tensors(4) if len(shape) == 2} == {qtype}
    assert choose_types([("blk.0.attn_q_norm.weight", (8, 64))], quant_type("q4_0"), 1) == {
        "blk.0.attn_q_norm.weight": Q.F32
    }


def test_80_layers_keep_attn_v_at_q5_k():
    types = choose_types(_layer_tensors(80), quant_type("q4_k_m"), 80)
    assert types["blk.11.attn_v.weight"] == Q.Q5_K and types["blk.12.attn_v.weight"] == Q.Q6_K


def _llama_cpp_quantize(source, target, file_type, pure=False):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = 2
    params.pure = pure
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0
    return {t.name: t for t in gguf.GGUFReader(target).tensors}


@pytest.fixture(scope="module")
def sixteen_layers(tmp_path_factory, llama_folder_writer):
    """9 layers, so that every rule picks some layers and not others (use_more_bits: 0, 3, 6, 7, 8; Q4_K_S: attn_v
    of 0-3, ffn_down of 0), and ffn_down rows of 288 (not 256-blocks: the fallbacks)."""
    write_llama_folder = llama_folder_writer
    root = tmp_path_factory.mktemp("mixes")
    shapes = dict(num_hidden_layers=9, hidden_size=256, intermediate_size=288, num_attention_heads=4)
    untied = write_llama_folder(root / "untied", num_key_value_heads=1, **shapes)
    tied = write_llama_folder(root / "tied", num_key_value_heads=1, tie_word_embeddings=True, **shapes)
    return {
        tie: (folder, write_gguf(folder, root / f"{tie}-f32.gguf", quant="f32"))
        for tie, folder in (("untied", untied), ("tied", tied))
    }


# Every quantized recipe untied; tied (the embedding then takes the output's rule) for one of each rule family.
CASES = [(q, "untied") for q in sorted(QUANT_TYPES) if q not in ("f32", "f16", "bf16")]
CASES += [("q4_k_m", "tied"), ("q4_0", "tied"), ("q8_0", "tied")]


@pytest.mark.parametrize("quant,tie", CASES)
def test_every_tensor_type_equals_llama_quantize(sixteen_layers, tmp_path, quant, tie):
    folder, f32 = sixteen_layers[tie]
    theirs = _llama_cpp_quantize(f32, tmp_path / "theirs.gguf", QUANT_TYPES[quant].file_type)
    ours = {t.name: t for t in gguf.GGUFReader(write_gguf(folder, tmp_path / "ours.gguf", quant=quant)).tensors}
    assert set(ours) == set(theirs)
    differ = {
        n: (ours[n].tensor_type.name, theirs[n].tensor_type.name)
        for n in ours
        if ours[n].tensor_type != theirs[n].tensor_type
    }
    assert differ == {}


@pytest.mark.parametrize("quant,qtype", [("q4_k_s", Q.Q4_K), ("q5_k_s", Q.Q5_K), ("q6_k", Q.Q6_K)])
def test_our_k_quants_are_as_accurate_as_llama_cpps(sixteen_layers, tmp_path, quant, qtype):
    """llama.cpp quantizing the same F32 weights (pure: every weight in the type) is the accuracy to match: our
    RMS error over all weights of that type may exceed its RMS error by at most 5%."""
    folder, f32 = sixteen_layers["untied"]
    originals = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(f32).tensors}
    theirs = _llama_cpp_quantize(f32, tmp_path / "theirs.gguf", QUANT_TYPES[quant].file_type, pure=True)
    ours = {t.name: t for t in gguf.GGUFReader(write_gguf(folder, tmp_path / "ours.gguf", quant=quant)).tensors}
    errors = {"ours": [], "theirs": []}
    for name, tensor in theirs.items():
        if tensor.tensor_type != qtype or ours[name].tensor_type != qtype:
            continue
        want = originals[name].reshape(-1)
        for who, source in (("theirs", tensor), ("ours", ours[name])):
            errors[who].append(gguf.quants.dequantize(source.data, qtype).reshape(-1) - want)
    ours_rms, theirs_rms = (float(np.sqrt(np.mean(np.concatenate(errors[w]) ** 2))) for w in ("ours", "theirs"))
    print(f"{quant}: RMS error ours {ours_rms:.3e}, llama.cpp {theirs_rms:.3e}")
    assert len(errors["ours"]) >= 9
    assert ours_rms <= 1.05 * theirs_rms
