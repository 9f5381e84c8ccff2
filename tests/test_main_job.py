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
