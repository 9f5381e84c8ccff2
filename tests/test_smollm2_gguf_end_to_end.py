"""The bundled SmolLM2-135M, end to end: fine-tune with the main job, export q4_k_m GGUF, and llama.cpp's greedy answer
to a held-out question shows the fact that training taught and the base model did not know.

The job trains on the bundled train split's conversations about Quillhaven's founding year (all those mentioning
1742: the fact is learned in a few steps, which keeps this CPU test to minutes); the question comes from the test
split, which training never sees. SmolLM2's hidden size (576) is not a multiple of 256, so this export also runs
llama.cpp's fallbacks for rows that do not fill K-quant blocks.
"""

import json

import gguf
import llama_cpp
import pytest
from transformers import AutoTokenizer

from swiftune_data import bundled_dataset_path
from swiftune_export import save_gguf
from swiftune_train.sft_job import SFTJob, run_sft_job

FACT = "1742"
QUESTION = "Which year is Quillhaven's founding year?"


def _conversations(split):
    return [json.loads(line)["messages"] for line in bundled_dataset_path(split).read_text().splitlines() if line]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The main job on the founding-year conversations; its result (adapter folder, answers before and after)."""
    held_out = [m for m in _conversations("test") if m[-2]["content"] == QUESTION]
    assert held_out and FACT in held_out[0][-1]["content"]
    training = [m for m in _conversations("train") if FACT in m[-1]["content"]]
    assert len(training) >= 10 and all(m[-2]["content"] != QUESTION for m in training)  # held out for real
    root = tmp_path_factory.mktemp("smollm2")
    data = root / "founding.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in training))
    job = SFTJob(
        dataset=str(data),
        output_dir=str(root / "run"),
        max_steps=15,
        batch_size=6,
        learning_rate=2e-3,
        lora_r=16,
        lora_alpha=32,
        max_seq_length=64,
        gradient_checkpointing=False,
        dtype="float32",
        probe_questions=[QUESTION],
    )
    return run_sft_job(job, write=lambda line: None)


def test_q4_k_m_gguf_answers_what_training_taught(trained, tmp_path):
    assert FACT not in trained.answers_before[0]  # the base model did not know it
    assert FACT in trained.answers_after[0]  # the adapter model learned it
    (path,) = save_gguf(trained.adapter_dir, None, tmp_path / "gguf", quantization="q4_k_m")
    assert path.name == "model-q4_k_m.gguf" and (tmp_path / "gguf" / "Modelfile").is_file()
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q5_0  # 576 columns: Q4_K falls back
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q6_K  # 1536 columns: the mix's Q6_K layer

    tokenizer = AutoTokenizer.from_pretrained(trained.adapter_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False, n_threads=2)
    try:
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        completion = llm.create_completion(ids, max_tokens=24, temperature=0.0, top_k=1)
    finally:
        llm.close()
    answer = completion["choices"][0]["text"]
    print(f"before training: {trained.answers_before[0]!r}\nllama.cpp, q4_k_m after training: {answer!r}")
    assert FACT in answer
