"""The walking skeleton end to end on a tiny model: swiftune train, then swiftune export, then plain libraries."""

import re

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from swiftune_cli.main import main


def test_train_then_export_gives_a_model_plain_transformers_loads(tiny_model_dir, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tiny_dataset),
            "--output-dir",
            str(out),
            "--max-steps",
            "12",
            "--batch-size",
            "4",
            "--learning-rate",
            "2e-2",
            "--max-seq-length",
            "64",
            "--question",
            "Who founded Quillhaven?",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "step 12/12" in printed and "before:" in printed and "after:" in printed
    first, last = map(float, re.search(r"loss: ([\d.]+) \(first steps\) -> ([\d.]+) \(last steps\)", printed).groups())
    assert last < first - 0.1

    adapter, merged = out / "adapter", out / "merged"
    assert main(["export", "--adapter", str(adapter), "--out", str(merged)]) == 0

    # The merged model, loaded by plain transformers, computes what base + adapter computes through peft.
    ids = torch.tensor([[1, 17, 40, 99, 5, 250]])
    merged_model = AutoModelForCausalLM.from_pretrained(merged).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    with torch.no_grad():
        merged_logits, adapted_logits = merged_model(ids).logits, adapted(ids).logits
        with adapted.disable_adapter():
            base_logits = adapted(ids).logits
    # float32 end to end: the merge reorders the same sums, so agreement is at float32 rounding level.
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)

    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who founded Quillhaven?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = merged_model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_export_to_gguf_and_lora_from_a_trained_adapter(tiny_model_dir, tiny_dataset, tmp_path, capsys):
    import gguf

    from swiftune_export.safetensors_files import iter_tensors, weight_files

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(tiny_dataset),
                "--output-dir",
                str(out),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--max-seq-length",
                "64",
                "--question",
                "hi",
            ]
        )
        == 0
    )
    adapter = out / "adapter"
    assert (
        main(
            [
                "export",
                "--adapter",
                str(adapter),
                "--out",
                str(tmp_path / "gguf"),
                "--method",
                "gguf",
                "--quant",
                "f32",
                "--quant",
                "q8_0",
            ]
        )
        == 0
    )
    files = sorted(p.name for p in (tmp_path / "gguf").iterdir())
    assert "model-f32.gguf" in files and "model-q8_0.gguf" in files and "Modelfile" in files
    # An independent reader sees the merged embedding exactly in the F32 file.
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "model-f32.gguf"))
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = dict(iter_tensors(weight_files(tmp_path / "merged")))
    token_embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert (
        token_embd.data.reshape(merged["model.embed_tokens.weight"].shape)
        == merged["model.embed_tokens.weight"].float().numpy()
    ).all()
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "lora"), "--method", "lora"]) == 0
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "x"), "--quant", "q8_0"]) == 1
    assert "--quant applies to --method gguf only" in capsys.readouterr().err
