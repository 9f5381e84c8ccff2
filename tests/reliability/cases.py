"""The bad-input table: each case is one wrong input, given to the ``swiftune`` command and to the Python API.

A case says how to call each (``cli(assets, work)`` -> argv; ``api(assets, work, loaded_model)`` raises), the
exception type the API must raise, and a regex that both error messages must match (the part that says what is
wrong or what to do). ``work`` is the case's own folder: outputs go to ``work / "out"``, and the whole folder must be
unchanged by the failure. ``early`` cases fail before any heavy import and run in a process of their own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from support import Assets, conversation, write_jsonl


@dataclass(frozen=True)
class Case:
    id: str
    cli: Callable[[Assets, Path], list[str]]
    api: Callable[[Assets, Path, tuple], None]
    error: type[BaseException]
    match: str
    setup: Callable[[Assets, Path], None] | None = None
    early: bool = False
    xfail_cli: str | None = None
    xfail_api: str | None = None


def out(work: Path) -> str:
    return str(work / "out")


# ---- train ----------------------------------------------------------------------------------------------------


def train_argv(a: Assets, work: Path, *extra, model=None, data=None) -> list[str]:
    return [
        "train",
        "--model",
        str(model or a.model),
        "--data",
        str(data or a.dataset),
        "--output-dir",
        out(work),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--max-seq-length",
        "64",
        *map(str, extra),
    ]


def run_job(a: Assets, work: Path, model=None, data=None, **fields) -> None:
    from swiftune_train import SFTJob, run_sft_job

    settings = dict(max_steps=1, batch_size=2, max_seq_length=64, gradient_checkpointing=False)
    settings.update(fields)
    job = SFTJob(model=str(model or a.model), dataset=str(data or a.dataset), output_dir=out(work), **settings)
    run_sft_job(job, write=lambda line: None)


def data_case(case_id, make, error, match, **kwargs) -> Case:
    """A case whose dataset file is written by ``make(work) -> path`` (inside ``work``, so it is snapshotted)."""
    return Case(
        case_id,
        cli=lambda a, w: train_argv(a, w, data=w / "data" / make.name),
        api=lambda a, w, m: run_job(a, w, data=w / "data" / make.name),
        error=error,
        match=match,
        setup=lambda a, w: make(w / "data"),
        **kwargs,
    )


def _writer(name: str, content: bytes | list | None):
    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, list):
            write_jsonl(path, content)
        else:
            path.mkdir()
        return path

    make.name = name
    return make


def _settings_case(case_id, flags, api, error, match, **kwargs) -> Case:
    return Case(case_id, lambda a, w: train_argv(a, w, *flags), api, error, match, **kwargs)


def _from_pretrained(a, **options):
    from swiftune_loader import FastLanguageModel

    FastLanguageModel.from_pretrained(a.model, **{"max_seq_length": 64, **options})


def _peft(loaded, **options):
    from swiftune_loader import FastLanguageModel

    FastLanguageModel.get_peft_model(loaded[0], **options)


def _empty_folder(a, w):
    (w / "model").mkdir(parents=True)


def _config_only(a, w):
    (w / "model").mkdir(parents=True)
    (w / "model" / "config.json").write_text((a.model / "config.json").read_text())


def _output_is_file(a, w):
    w.mkdir(parents=True, exist_ok=True)
    (w / "out").write_text("keep me")


LONG_PROMPT = [conversation("word " * 200, "Yes.")] * 4

TRAIN_CASES = [
    Case(
        "model_missing",
        lambda a, w: train_argv(a, w, model=w / "none"),
        lambda a, w, m: run_job(a, w, model=w / "none"),
        FileNotFoundError,
        r"does not exist; pass the folder that holds config\.json",
    ),
    Case(
        "model_is_a_file",
        lambda a, w: train_argv(a, w, model=a.dataset),
        lambda a, w, m: run_job(a, w, model=a.dataset),
        FileNotFoundError,
        r"is a file; pass the folder",
    ),
    Case(
        "model_folder_without_config",
        lambda a, w: train_argv(a, w, model=w / "model"),
        lambda a, w, m: run_job(a, w, model=w / "model"),
        FileNotFoundError,
        r"no config\.json",
        setup=_empty_folder,
    ),
    Case(
        "model_folder_without_weights",
        lambda a, w: train_argv(a, w, model=w / "model"),
        lambda a, w, m: run_job(a, w, model=w / "model"),
        FileNotFoundError,
        r"no weight files",
        setup=_config_only,
    ),
    Case(
        "model_with_only_pickle_weights",
        lambda a, w: train_argv(a, w, model=a.pickle_model),
        lambda a, w, m: run_job(a, w, model=a.pickle_model),
        ValueError,
        r"only pickle weights.*allow_pickle=True",
    ),
    Case(
        "model_that_needs_remote_code",
        lambda a, w: train_argv(a, w, model=a.remote_code_model),
        lambda a, w, m: run_job(a, w, model=a.remote_code_model),
        ValueError,
        r"auto_map.*trust_remote_code=True",
    ),
    Case(
        "model_with_corrupt_safetensors",
        lambda a, w: train_argv(a, w, model=a.corrupt_model),
        lambda a, w, m: run_job(a, w, model=a.corrupt_model),
        ValueError,
        r"not a complete safetensors file.*(copy|save)",
    ),
    Case(
        "dataset_missing",
        lambda a, w: train_argv(a, w, data=w / "none.jsonl"),
        lambda a, w, m: run_job(a, w, data=w / "none.jsonl"),
        FileNotFoundError,
        r"Dataset file .*none\.jsonl' does not exist",
    ),
    data_case("dataset_is_a_folder", _writer("rows.jsonl", None), FileNotFoundError, r"is a folder; pass one \.jsonl"),
    data_case("dataset_unknown_extension", _writer("rows.xml", b"<rows/>"), ValueError, r"use one of \.csv"),
    data_case(
        "dataset_wrong_columns",
        _writer("rows.jsonl", [{"question": "a", "reply": "b"}] * 3),
        ValueError,
        r"No known dataset format fits the columns \['question', 'reply'\]",
    ),
    data_case(
        "dataset_missing_column",
        _writer("rows.jsonl", [{"instruction": "Say hi."}] * 3),
        ValueError,
        r"No known dataset format fits the columns \['instruction'\]",
    ),
    data_case("dataset_empty", _writer("rows.jsonl", b""), ValueError, r"holds no rows|Could not parse"),
    data_case(
        "dataset_broken_json",
        _writer("rows.jsonl", b'{"messages": [{"role": "user", "content": "hi"\n'),
        ValueError,
        r"Could not parse .*rows\.jsonl",
    ),
    data_case(
        "dataset_not_utf8",
        _writer("rows.jsonl", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'),
        ValueError,
        r"is not UTF-8 .*re-save it as UTF-8",
    ),
    data_case(
        "dataset_unknown_role",
        _writer("rows.jsonl", [{"messages": [{"role": "robot", "content": "hi"}]}] * 2),
        ValueError,
        r"Unknown role 'robot'.*use system, user or assistant",
    ),
    data_case(
        "labels_all_masked",
        _writer("rows.jsonl", LONG_PROMPT),
        ValueError,
        r"Every label is -100.*max_length=64",
    ),
    Case(
        "dataset_format_mismatch",
        lambda a, w: train_argv(a, w, "--format", "alpaca"),
        lambda a, w, m: __import__("swiftune_cli.train_job", fromlist=["x"]).check_dataset_format(
            str(a.dataset), "alpaca"
        ),
        ValueError,
        r"dataset_format is alpaca, which needs the columns",
    ),
    Case(
        "output_dir_is_a_file",
        lambda a, w: train_argv(a, w),
        lambda a, w, m: run_job(a, w),
        FileExistsError,
        r"is an existing file; pass a folder",
        setup=_output_is_file,
        early=False,
    ),
    _settings_case(
        "lora_r_zero",
        ["--lora-r", "0"],
        lambda a, w, m: _peft(m, r=0),
        ValueError,
        r"must be a positive integer",
        early=True,
    ),
    _settings_case(
        "lora_alpha_negative",
        ["--lora-alpha", "-8"],
        lambda a, w, m: _peft(m, lora_alpha=-8),
        ValueError,
        r"lora_alpha must be (a )?positive",
        early=True,
    ),
    _settings_case(
        "lora_dropout_one",
        ["--lora-dropout", "1.0"],
        lambda a, w, m: _peft(m, lora_dropout=1.0),
        ValueError,
        r"lora_dropout must be in \[0, 1\)",
        early=True,
    ),
    _settings_case(
        "target_module_unknown",
        ["--target-modules", "nope_proj"],
        lambda a, w, m: _peft(m, target_modules=["nope_proj"]),
        ValueError,
        r"\['nope_proj'\] match no module .*pass some of those",
    ),
    _settings_case(
        "max_seq_length_zero",
        ["--max-seq-length", "0"],
        lambda a, w, m: _from_pretrained(a, max_seq_length=0),
        ValueError,
        r"max_seq_length must be a positive",
        early=True,
    ),
    _settings_case(
        "load_in_4bit_and_8bit",
        ["--load-in-4bit", "--load-in-8bit"],
        lambda a, w, m: _from_pretrained(a, load_in_4bit=True, load_in_8bit=True),
        ValueError,
        r"Choose one of load_in_4bit and load_in_8bit",
        early=True,
    ),
    _settings_case(
        "load_in_4bit_with_full_finetuning",
        ["--load-in-4bit", "--full-finetuning"],
        lambda a, w, m: _from_pretrained(a, load_in_4bit=True, full_finetuning=True),
        ValueError,
        r"full_finetuning .*cannot use quantized weights",
        early=True,
    ),
    _settings_case(
        "dtype_unknown",
        ["--dtype", "float7"],
        lambda a, w, m: _from_pretrained(a, dtype="float7"),
        ValueError,
        r"float7",
        early=True,
    ),
    _settings_case(
        "learning_rate_nan",
        ["--lr", "nan"],
        lambda a, w, m: run_job(a, w, learning_rate=math.nan),
        ValueError,
        r"learning_rate must be a positive finite number, got nan",
    ),
    _settings_case(
        "learning_rate_negative",
        ["--lr", "-0.001"],
        lambda a, w, m: run_job(a, w, learning_rate=-1e-3),
        ValueError,
        r"learning_rate must be (a )?positive",
        early=True,
    ),
    Case(
        "unknown_chat_template",
        lambda a, w: train_argv(a, w, "--template", "no-such-template", "--dry-run"),
        lambda a, w, m: __import__("swiftune_data").get_chat_template(m[1], "no-such-template"),
        ValueError,
        r"Unknown chat template 'no-such-template'; known templates",
    ),
    Case(
        "unknown_chat_template_in_training",
        lambda a, w: train_argv(a, w, "--template", "no-such-template"),
        lambda a, w, m: run_job(a, w, chat_template="no-such-template"),
        ValueError,
        r"Unknown chat template 'no-such-template'; known templates",
    ),
    Case(
        "config_file_missing",
        lambda a, w: ["train", "--config", str(w / "none.yaml")],
        lambda a, w, m: __import__("swiftune_cli.config_file", fromlist=["x"]).merged_config(str(w / "none.yaml"), {}),
        FileNotFoundError,
        r"none\.yaml",
        early=True,
    ),
    Case(
        "config_file_unknown_key",
        lambda a, w: ["train", "--config", str(w / "c.yaml")],
        lambda a, w, m: __import__("swiftune_cli.config_file", fromlist=["x"]).merged_config(str(w / "c.yaml"), {}),
        ValueError,
        r"unknown key 'lora_rank'",
        setup=lambda a, w: (w.mkdir(parents=True), (w / "c.yaml").write_text("lora_rank: 8\n")),
        early=True,
    ),
]


# ---- packing with a vision model -----------------------------------------------------------------------------


def _vision_folder(a: Assets, w: Path) -> None:
    folder = w / "vision-model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]})
    )
    (folder / "model.safetensors").write_bytes((a.model / "model.safetensors").read_bytes())


def _pack_images(a, w, m):
    from swiftune_data import pack_sequences

    pack_sequences([{"input_ids": [1, 2, 3], "pixel_values": [[0.0]]}], max_length=8)


VISION_CASES = [
    Case(
        "packing_with_a_vision_model",
        lambda a, w: train_argv(a, w, "--packing", model=w / "vision-model"),
        _pack_images,
        ValueError,
        r"packing.*vision models|vision.*packing",
        setup=_vision_folder,
    ),
]


# ---- export and chat -----------------------------------------------------------------------------------------


def _export(a, w, source, **options):
    from swiftune_export import save_merged

    save_merged(str(source), out=out(w), **options)


def _existing_output(a, w):
    (w / "out").mkdir(parents=True)
    (w / "out" / "keep.txt").write_text("an earlier export")


def _open_chat(path):
    from swiftune_cli.chat_backends import open_chat

    open_chat(str(path))


EXPORT_CASES = [
    Case(
        "export_adapter_missing",
        lambda a, w: ["export", str(w / "none"), "--out", out(w)],
        lambda a, w, m: _export(a, w, w / "none"),
        FileNotFoundError,
        r"does not exist",
    ),
    Case(
        "export_over_existing_output",
        lambda a, w: ["export", str(a.adapter), "--out", out(w)],
        lambda a, w, m: _export(a, w, a.adapter),
        FileExistsError,
        r"overwrite",
        setup=_existing_output,
    ),
    Case(
        "export_gguf_over_existing_output",
        lambda a, w: ["export", str(a.adapter), "--method", "gguf", "--quant", "f16", "--out", out(w)],
        lambda a, w, m: _export(a, w, a.adapter, method="gguf", quantization="f16"),
        FileExistsError,
        r"overwrite",
        setup=_existing_output,
    ),
    Case(
        "export_unknown_gguf_type",
        lambda a, w: ["export", str(a.adapter), "--method", "gguf", "--quant", "q9_9", "--out", out(w)],
        lambda a, w, m: _export(a, w, a.adapter, method="gguf", quantization="q9_9"),
        ValueError,
        r"q9_9",
    ),
    Case(
        "export_unknown_method",
        lambda a, w: ["export", str(a.adapter), "--method", "merged_3bit", "--out", out(w)],
        lambda a, w, m: _export(a, w, a.adapter, method="merged_3bit"),
        ValueError,
        r"merged_3bit",
        early=True,
    ),
    Case(
        "export_corrupt_adapter",
        lambda a, w: ["export", str(a.corrupt_adapter), "--out", out(w)],
        lambda a, w, m: _export(a, w, a.corrupt_adapter),
        ValueError,
        r"not a complete safetensors file",
    ),
    Case(
        "export_corrupt_model",
        lambda a, w: ["export", str(a.corrupt_model), "--method", "gguf", "--quant", "f16", "--out", out(w)],
        lambda a, w, m: _export(a, w, a.corrupt_model, method="gguf", quantization="f16"),
        ValueError,
        r"not a complete safetensors file",
    ),
    Case(
        "export_pickle_only_model",
        lambda a, w: ["export", str(a.pickle_model), "--method", "gguf", "--quant", "f16", "--out", out(w)],
        lambda a, w, m: _export(a, w, a.pickle_model, method="gguf", quantization="f16"),
        FileNotFoundError,
        r"only pickle \.bin weights",
    ),
    Case(
        "export_output_parent_is_a_file",
        lambda a, w: ["export", str(a.adapter), "--out", str(w / "file" / "out")],
        lambda a, w, m: __import__("swiftune_export").save_merged(str(a.adapter), out=str(w / "file" / "out")),
        (FileExistsError, NotADirectoryError),
        r"file",
        setup=lambda a, w: (w.mkdir(parents=True), (w / "file").write_text("a file, not a folder")),
    ),
    Case(
        "chat_with_truncated_gguf",
        lambda a, w: ["chat", str(a.truncated_gguf), "--prompt", "hi"],
        lambda a, w, m: _open_chat(a.truncated_gguf),
        ValueError,
        r"could not load .*truncated\.gguf|broken file",
    ),
    Case(
        "chat_with_missing_gguf",
        lambda a, w: ["chat", str(w / "none.gguf"), "--prompt", "hi"],
        lambda a, w, m: _open_chat(w / "none.gguf"),
        (FileNotFoundError, ValueError),
        r"none\.gguf.*does not exist|llama-cpp-python",
    ),
    Case(
        "chat_with_missing_model",
        lambda a, w: ["chat", str(w / "none"), "--prompt", "hi"],
        lambda a, w, m: _open_chat(w / "none"),
        FileNotFoundError,
        r"does not exist",
    ),
]

CASES = TRAIN_CASES + VISION_CASES + EXPORT_CASES
