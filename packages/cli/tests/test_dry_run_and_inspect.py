"""``swiftune train --dry-run`` and ``swiftune inspect`` on a tiny model: what they report is what the files hold."""

import hashlib
import json
import re

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from swiftune_cli import dry_run
from swiftune_cli.main import main


def _parameters(model_dir) -> int:
    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def _first_messages(dataset):
    return json.loads(dataset.read_text().splitlines()[0])["messages"]


def test_dry_run_reports_every_check_and_writes_nothing(tiny_model_dir, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--dry-run", "--model", str(tiny_model_dir), "--data", str(tiny_dataset)]
    rc = main([*argv, "--output-dir", str(out), "--max-steps", "5", "--batch-size", "4", "--lora-r", "4"])
    report = capsys.readouterr().out
    assert rc == 0, report
    lines = {line.split()[1]: line for line in report.splitlines() if line.startswith("  ok")}
    assert set(lines) == {"settings", "model", "tokenizer", "dataset", "template", "lora", "memory", "steps"}
    assert "llama (LlamaForCausalLM), fast path: yes" in lines["model"]
    assert f"{_parameters(tiny_model_dir) / 1e3:.1f}K parameters" in lines["model"]
    assert "chat template: chatml" in lines["tokenizer"] and "8 rows, format messages" in lines["dataset"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = _first_messages(tiny_dataset)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    answer = messages[1]["content"] + "<|im_end|>\n"  # what ChatML writes for an assistant turn
    total, trained = len(tokenizer(rendered)["input_ids"]), len(tokenizer(answer)["input_ids"])
    assert f"renders to {total} tokens, {trained} trained" in lines["template"]
    # hidden 32: q, o 32x32; k, v 32x16; gate, up, down 32x64; two layers; r * (in + out) each
    lora = 2 * 4 * (64 + 64 + 96 * 3 + 48 * 2)
    assert f"r=4 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj: {lora / 1e3:.1f}K" in lines["lora"]
    rows = [json.loads(line)["messages"] for line in tiny_dataset.read_text().splitlines()]
    longest = max(len(tokenizer(tokenizer.apply_chat_template(m, tokenize=False))["input_ids"]) for m in rows)
    assert f"float32, 4 x {longest} tokens)" in lines["memory"]  # padded to the longest row, not max_seq_length
    assert lines["memory"].endswith(": fits")
    assert "5 optimizer steps of 4 sequences" in lines["steps"]
    assert report.rstrip().endswith("run the same command without --dry-run to train.")
    assert not out.exists()


def test_dry_run_lists_every_problem_then_fails(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dry_run, "device_memory", lambda: (1024**2, "RAM available"))
    argv = ["train", "--dry-run", "--model", str(tiny_model_dir), "--data", str(tmp_path / "none.jsonl")]
    assert main([*argv, "--output-dir", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    failed = {line.split()[1] for line in captured.out.splitlines() if line.startswith("  FAIL")}
    assert {"dataset", "memory"} <= failed
    assert "ok    model" in captured.out  # the checks after a failure still ran
    assert re.search(r"the dry run found \d+ problems; first, ", captured.err) and captured.err.count("\n") == 1
    assert "may not fit; lower batch_size" in captured.out


def test_inspect_model(tiny_model_dir, capsys):
    assert main(["inspect", str(tiny_model_dir)]) == 0
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert rows["architecture"] == "LlamaForCausalLM (model_type llama)"
    assert rows["fast path"].startswith("yes")
    assert rows["parameters"].endswith(f"({_parameters(tiny_model_dir):,})")
    assert rows["dtype"] == "F32 (as stored)" and rows["quantization"] == "none"
    assert rows["shape"] == "2 layers, hidden 32, vocabulary 384"
    assert rows["repairs"] == "none needed"


def test_inspect_lists_repairs_without_changing_the_folder(tmp_path, capsys):
    from swiftune_loader.testing import build_tiny_model
    from swiftune_tokenizers_fix.testing import build_chat_tokenizer

    folder = build_tiny_model(tmp_path / "nopad", build_chat_tokenizer(pad_token=None), pad_token_id=None)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "2 would apply when training" in out
    assert "- pad_token: found no pad token" in out and "- embedding_size: found token ids 384..384" in out
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == before


def test_inspect_dataset_marks_exactly_the_trained_span(tiny_model_dir, tiny_dataset, capsys):
    assert main(["inspect", "--dataset", str(tiny_dataset), "--model", str(tiny_model_dir), "--example", "1"]) == 0
    out = capsys.readouterr().out
    assert "8 rows, format messages" in out and "template  chatml" in out
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = json.loads(tiny_dataset.read_text().splitlines()[1])["messages"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    shown = out.split("):\n\n", 1)[1].split("\n\ntokens", 1)[0]
    assert re.findall(r"\[\[(.*?)\]\]", shown, flags=re.S) == [messages[1]["content"] + "<|im_end|>\n"]
    assert shown.replace("[[", "").replace("]]", "") == rendered
    total = len(tokenizer(rendered)["input_ids"])
    trained = len(tokenizer(messages[1]["content"] + "<|im_end|>\n")["input_ids"])
    assert f"tokens    {total} ({trained} trained, {total - trained} masked)" in out


def test_inspect_dataset_with_all_tokens_color_and_another_template(tiny_model_dir, tiny_dataset, capsys):
    argv = ["inspect", "--dataset", str(tiny_dataset), str(tiny_model_dir), "--all-tokens", "--color", "always"]
    assert main([*argv, "--template", "llama-3"]) == 0
    out = capsys.readouterr().out
    assert "template  llama-3" in out and "<|start_header_id|>user<|end_header_id|>" in out
    shown = out.split("):\n\n", 1)[1].split("\n\ntokens", 1)[0]
    assert shown.startswith("\x1b[1;32m") and shown.count("\x1b[1;32m") == 1  # one span: every token trains
    assert "masked)" in out and " 0 masked" in out


@pytest.mark.parametrize(
    "argv,words",
    [
        (["inspect", "/no/such/model"], "does not exist"),
        (["inspect", "--dataset", "/no/such.jsonl"], "does not exist"),
        (["inspect", "--template", "chatml"], "--template applies to --dataset"),
    ],
)
def test_inspect_errors_are_one_line(argv, words, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
