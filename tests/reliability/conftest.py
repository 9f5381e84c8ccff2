"""Shared inputs of the reliability suite, built once per session: a tiny model, a dataset, an adapter, and the
broken variants of each that the bad-input cases feed to swiftune.

The ``swiftune`` command is run in a subprocess. Importing torch, transformers and TRL takes tens of seconds on a
loaded machine, so the cases whose error comes after those imports run in ONE subprocess (``cli_driver.py``) that
calls the command's entry point (``swiftune_cli.main.main``) once per case; it is started as soon as the assets exist
and works while the API tests run in this process. Cases that fail before any heavy import run each in a process of
their own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# The suite's helper modules (support.py, cases.py) sit beside this file; pytest runs with --import-mode=importlib,
# which does not put test folders on sys.path.
sys.path.insert(0, str(Path(__file__).parent))

from support import (  # noqa: E402
    API_ROOT,
    CLI_ROOT,
    QA,
    Assets,
    CliRuns,
    background_runs,
    conversation,
    copy_model,
    tree_snapshot,
    write_jsonl,
)

# Commands run by the driver besides the bad-input cases: (test name, job id) -> argv builder.
EXTRA_JOBS = {
    ("test_long_example_is_truncated_with_a_warning_by_the_command", "long_example"): lambda a, root: [
        "train",
        "--model",
        str(a.model),
        "--data",
        str(a.long_dataset),
        "--output-dir",
        str(root / "long-out"),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--max-seq-length",
        "64",
    ],
}


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from swiftune_export import write_gguf
    from swiftune_loader.testing import build_tiny_model
    from swiftune_tokenizers_fix.testing import build_chat_tokenizer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("assets")
    model = build_tiny_model(root / "model", build_chat_tokenizer())
    dataset = write_jsonl(root / "qa.jsonl", [conversation(q, a) for q, a in QA] * 2)

    # Only pickle weights: the same state dict, saved with torch.save as transformers' pytorch_model.bin.
    pickle_model = copy_model(model, root / "pickle-model")
    torch.save(load_file(str(pickle_model / "model.safetensors")), pickle_model / "pytorch_model.bin")
    (pickle_model / "model.safetensors").unlink()

    # A folder that ships its own architecture code (auto_map) for a model_type transformers does not know.
    remote = copy_model(model, root / "remote-code-model")
    config = json.loads((remote / "config.json").read_text())
    config.update(
        model_type="quillnet",
        architectures=["QuillNetForCausalLM"],
        auto_map={"AutoConfig": "configuration_quillnet.QuillNetConfig", "AutoModelForCausalLM": "modeling.QuillNet"},
    )
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "configuration_quillnet.py").write_text("raise SystemExit('remote code ran')\n")

    # A safetensors file cut in the middle of its tensors' bytes.
    corrupt = copy_model(model, root / "corrupt-model")
    weights = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])

    base = AutoModelForCausalLM.from_pretrained(model)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = root / "adapter"
    peft_model.save_pretrained(adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(model)
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    corrupt_adapter = copy_model(adapter, root / "corrupt-adapter")
    (corrupt_adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")

    gguf = write_gguf(model, root / "whole.gguf", quant="f32")
    truncated_gguf = root / "truncated.gguf"
    truncated_gguf.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 3])

    long_rows = [conversation(q, a) for q, a in QA] + [conversation("Tell me everything. " * 200, "All of it. " * 200)]
    long_dataset = write_jsonl(root / "long.jsonl", long_rows)
    return Assets(
        root,
        model,
        dataset,
        adapter,
        pickle_model,
        remote,
        corrupt,
        corrupt_adapter,
        truncated_gguf,
        long_dataset,
    )


@pytest.fixture(scope="session")
def loaded_model(assets):
    """The tiny model and tokenizer, loaded once for the cases that only need an in-memory model."""
    from swiftune_loader import FastLanguageModel

    return FastLanguageModel.from_pretrained(assets.model, max_seq_length=64, use_gradient_checkpointing=False)


@pytest.fixture(scope="session")
def case_folders(assets, tmp_path_factory):
    """Each case's work folder for the API and for the command, set up, with their snapshots taken."""
    from cases import CASES

    root = tmp_path_factory.mktemp("cases")
    folders = {}
    for kind in (API_ROOT, CLI_ROOT):
        for case in CASES:
            work = root / kind / case.id
            if case.setup is not None:
                case.setup(assets, work)
            work.mkdir(parents=True, exist_ok=True)
            folders[kind, case.id] = (work, tree_snapshot(work))
    return folders


@pytest.fixture(scope="session")
def cli_runs(request, assets, case_folders, tmp_path_factory):
    """Starts the command for every selected late case in one driver subprocess, while the API cases run here."""
    from cases import CASES

    selected = {item.callspec.id for item in request.session.items if item.originalname == "test_cli"}
    names = {item.originalname for item in request.session.items}
    root = tmp_path_factory.mktemp("cli-driver")
    jobs = {
        case.id: case.cli(assets, case_folders[CLI_ROOT, case.id][0])
        for case in CASES
        if not case.early and case.id in selected
    }
    jobs.update({job: argv(assets, root) for (test, job), argv in EXTRA_JOBS.items() if test in names})
    runs = CliRuns(root, jobs)
    yield runs
    runs.close()


@pytest.fixture(scope="session", autouse=True)
def background(request, assets, cli_runs, tmp_path_factory):
    """Starts, at the beginning of the session, every subprocess the selected tests need (the command driver above,
    and the fault tests' children), so that their slow imports overlap one another and the in-process tests.

    Returns {name: BackgroundRun} for the fault tests (see test_faults.py).
    """
    names = {item.originalname for item in request.session.items}
    runs = background_runs(assets, tmp_path_factory.mktemp("faults"), names)
    yield runs
    for run in runs.values():
        run.close()
