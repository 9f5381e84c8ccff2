"""``swiftune export`` (progress, GGUF types, refusals) and ``swiftune chat`` (adapter, streaming, conversation)."""

import io
import sys

import gguf
import pytest
import torch

from swiftune_cli import chat_backends
from swiftune_cli.main import main


@pytest.fixture(scope="module")
def training_output(tiny_model_dir, tmp_path_factory):
    """A training output folder holding adapter/: LoRA with random (non-zero) weights on the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("run")
    get_peft_model(model, config).save_pretrained(out / "adapter")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out / "adapter")
    return out


def test_export_model_folder_to_several_gguf_types_with_progress(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "gguf"
    assert main(["export", str(tiny_model_dir), "--method", "gguf", "--quant", "f16,q8_0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    steps = [line.strip() for line in printed.splitlines() if line.strip().startswith("[")]
    assert steps == [
        "[1/3] writing GGUF f16",
        "[2/3] writing GGUF q8_0",
        "[3/3] writing the Ollama Modelfile (FROM model-f16.gguf)",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model-f16.gguf", "model-q8_0.gguf"]
    for name, qtype in (("f16", gguf.GGMLQuantizationType.F16), ("q8_0", gguf.GGMLQuantizationType.Q8_0)):
        reader = gguf.GGUFReader(out / f"model-{name}.gguf")
        arch = reader.fields["general.architecture"]
        assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
        assert {t.name: t.tensor_type for t in reader.tensors}["blk.0.attn_q.weight"] == qtype
    assert (out / "Modelfile").read_text().startswith("FROM ./model-f16.gguf\n")
    assert f"swiftune chat {out / 'model-f16.gguf'}" in printed


def test_export_of_a_training_output_folder_merges_its_adapter(training_output, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(training_output), "--out", str(out)]) == 0
    assert f"exporting {training_output / 'adapter'} as merged_16bit" in capsys.readouterr().out
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--quant", "q8_0"], "--quant applies to --method gguf only"),
        (["--method", "gguf", "--quant", "q3_x"], "Unknown GGUF quantization 'q3_x'"),
    ],
)
def test_export_refusals_write_nothing(tiny_model_dir, tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    assert main(["export", str(tiny_model_dir), "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_export_keeps_an_existing_folder_without_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(tiny_model_dir), "--method", "gguf", "--quant", "f16", "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_chat_prompt_with_adapter_streams_the_greedy_answer(tiny_model_dir, training_output, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swiftune_loader import chat_reply

    question = "Who founded Quillhaven?"
    adapter = training_output / "adapter"
    argv = ["chat", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", question, "--max-new-tokens", "12"]
    assert main(argv) == 0
    streamed = capsys.readouterr().out
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    expected = chat_reply(model, AutoTokenizer.from_pretrained(adapter), question, max_new_tokens=12)
    base = chat_reply(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(adapter),
        question,
        max_new_tokens=12,
    )
    assert expected != base  # the adapter changes the answer, so the comparison below sees it
    assert streamed.strip() == expected


class RecordingChat:
    def __init__(self):
        self.seen = []

    def stream(self, messages, max_new_tokens, temperature):
        self.seen.append([dict(m) for m in messages])
        yield from ("ans", f"wer {len(self.seen)}")


def test_interactive_chat_keeps_the_conversation_until_reset_or_exit(monkeypatch, capsys):
    chat = RecordingChat()
    monkeypatch.setattr(chat_backends, "open_chat", lambda *args, **kwargs: chat)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nagain\n/reset\nfresh\n/exit\nnever read\n"))
    assert main(["chat", "some-model", "--system", "Be brief."]) == 0
    system = {"role": "system", "content": "Be brief."}
    assert chat.seen == [
        [system, {"role": "user", "content": "hello"}],
        [
            system,
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "answer 1"},
            {"role": "user", "content": "again"},
        ],
        [system, {"role": "user", "content": "fresh"}],
    ]
    assert capsys.readouterr().out == "answer 1\nanswer 2\nanswer 3\n"


def test_chat_with_gguf_needs_llama_cpp(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    assert main(["chat", str(tmp_path / "model.gguf"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "needs llama-cpp-python" in err and "pip install llama-cpp-python" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv,words",
    [
        (["chat", "x.gguf", "--adapter", "a"], "--adapter applies to model folders"),
        (["chat", "--max-new-tokens", "0", "--prompt", "hi"], "--max-new-tokens must be positive"),
    ],
)
def test_chat_usage_mistakes(argv, words, capsys):
    assert main(argv) == 1
    assert words in capsys.readouterr().err
