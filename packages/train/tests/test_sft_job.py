import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from swiftune_train import SFTJob, run_sft_job


def _job(model_dir, dataset, output_dir, **overrides):
    settings = dict(
        model=str(model_dir),
        dataset=str(dataset),
        output_dir=str(output_dir),
        max_steps=12,
        batch_size=4,
        learning_rate=2e-2,
        lora_r=8,
        lora_alpha=16,
        gradient_checkpointing=False,
        max_seq_length=64,
        probe_questions=["Who founded Quillhaven?"],
    )
    settings.update(overrides)
    return SFTJob(**settings)


def test_job_lowers_the_loss_and_saves_an_adapter_peft_reloads(tiny_model_dir, tiny_dataset, tmp_path):
    lines = []
    result = run_sft_job(_job(tiny_model_dir, tiny_dataset, tmp_path / "out"), write=lines.append)
    # The same 16 conversations are seen again and again: the mean of the last five logged losses must sit
    # clearly below the first five (a random tiny model starts near ln(vocab) = 5.95).
    assert len(result.losses) == 12 and result.last_loss < result.first_loss - 0.1
    assert any(line.startswith("step 12/12  loss") for line in lines)
    assert all(" tok/s  peak " in line for line in lines if line.startswith("step "))
    assert result.loss_curve == tmp_path / "out" / "loss_curve.png"
    assert result.loss_curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "out" / "runs").exists(), "something was reported without being asked"
    assert len(result.answers_before) == len(result.answers_after) == 1

    adapter_dir = tmp_path / "out" / "adapter"
    assert result.adapter_dir == adapter_dir
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and (adapter_dir / "tokenizer_config.json").is_file()
    # A plain peft reload answers like the trained model did.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = torch.tensor([[1, 5, 9, 20, 7]])
    with torch.no_grad():
        adapted = reloaded(ids).logits
        with reloaded.disable_adapter():
            plain = reloaded(ids).logits
    assert not torch.allclose(plain, adapted, atol=1e-3), "the saved adapter changes nothing"


def test_missing_dataset_fails_before_loading_the_model(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_sft_job(_job(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_dataset_without_needed_fields_names_its_columns(tiny_model_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "reply": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"\['question', 'reply'\]"):
        run_sft_job(_job(tiny_model_dir, path, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_output_path_that_is_a_file_is_refused(tiny_model_dir, tiny_dataset, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep")
    with pytest.raises(FileExistsError, match="existing file"):
        run_sft_job(_job(tiny_model_dir, tiny_dataset, target))
    assert target.read_text() == "keep"


def test_non_finite_loss_stops_without_saving(tiny_model_dir, tiny_dataset, tmp_path):
    with pytest.raises(FloatingPointError, match="Training stopped at step"):
        run_sft_job(_job(tiny_model_dir, tiny_dataset, tmp_path / "out", learning_rate=1e12, max_steps=6))
    assert not (tmp_path / "out" / "adapter").exists()


def test_embedding_learning_rate_and_tensorboard_reach_the_trainer(tiny_model_dir, tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="modules_to_save"):  # the rate reaches the optimizer, which has no embeddings
        run_sft_job(_job(tiny_model_dir, tiny_dataset, tmp_path / "bad", max_steps=1, embedding_learning_rate=1e-3))

    job = _job(
        tiny_model_dir,
        tiny_dataset,
        tmp_path / "out",
        max_steps=2,
        probe_questions=[],
        modules_to_save=["embed_tokens"],
        embedding_learning_rate=1e-3,
        report_to=["tensorboard"],
    )
    result = run_sft_job(job, write=lambda line: None)
    assert list((tmp_path / "out" / "runs").rglob("events.out.tfevents*")), "no TensorBoard events were kept"
    from safetensors import safe_open

    with safe_open(result.adapter_dir / "adapter_model.safetensors", "pt") as saved:
        assert any("embed_tokens" in key for key in saved.keys())
