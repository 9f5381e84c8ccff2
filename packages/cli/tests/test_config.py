"""The train settings: one schema for flags and YAML keys, merge precedence, --print-config, clear errors.

These run the real command in a subprocess: none of them imports torch, so each takes a fraction of a second.
"""

import subprocess
import sys

import pytest
import yaml

from swiftune_cli.config_schema import OPTIONS, defaults

COMMAND = [sys.executable, "-m", "swiftune_cli.main"]


def swiftune(*args):
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, timeout=60)


def printed_config(*args) -> dict:
    run = swiftune("train", *args, "--print-config")
    assert run.returncode == 0, run.stderr
    return yaml.safe_load(run.stdout)


def test_help_imports_no_torch_and_answers_fast():
    code = (
        "import sys, time\nstart = time.perf_counter()\nfrom swiftune_cli.main import main\n"
        "for argv in (['--help'], *([name, '--help'] for name in ('train', 'export', 'chat', 'inspect'))):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('seconds', time.perf_counter() - start)\n"
        "print('heavy', sorted(m for m in ('torch', 'transformers', 'datasets', 'yaml') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "heavy []" in run.stdout
    assert " torch" not in run.stderr.replace("|", " ")  # -X importtime lists every module imported
    seconds = float(run.stdout.split("seconds ")[1].split()[0])
    assert seconds < 1.0, f"swiftune --help (all five) took {seconds:.2f} s"


def test_defaults_file_flags_precedence(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lora_r: 32\nlearning_rate: 5e-4\nbatch_size: 2\ntarget_modules: q_proj, v_proj\n")
    merged = printed_config("--config", config, "--lora-r", "64", "--no-train-on-responses-only")
    assert merged["lora_r"] == 64  # the flag beats the file
    assert merged["learning_rate"] == 5e-4 and merged["batch_size"] == 2  # the file beats the defaults
    assert merged["target_modules"] == ["q_proj", "v_proj"]
    assert merged["train_on_responses_only"] is False
    untouched = {key for key in defaults()} - {"lora_r", "learning_rate", "batch_size", "target_modules"}
    assert {key: merged[key] for key in untouched - {"train_on_responses_only"}} == {
        key: defaults()[key] for key in untouched - {"train_on_responses_only"}
    }


def test_printed_config_reads_back_unchanged(tmp_path):
    first = swiftune(
        "train",
        "--lr",
        "3e-4",
        "--question",
        "a, b?",
        "--question",
        "c",
        "--report-to",
        "tensorboard",
        "--print-config",
    )
    assert first.returncode == 0, first.stderr
    saved = tmp_path / "saved.yaml"
    saved.write_text(first.stdout)
    again = swiftune("train", "--config", saved, "--print-config")
    assert again.stdout == first.stdout
    merged = yaml.safe_load(first.stdout)
    assert merged["questions"] == ["a, b?", "c"] and merged["report_to"] == ["tensorboard"]
    assert merged["learning_rate"] == 3e-4


def test_every_option_is_a_flag_and_a_key():
    help_text = swiftune("train", "--help").stdout
    printed = printed_config()
    for option in OPTIONS:
        assert option.flag in help_text, option.key
        assert option.key in printed, option.key


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("lora_r: 8\nlearning_rat: 1e-4\n")
    run = swiftune("train", "--config", config, "--print-config")
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "'learning_rat'" in run.stderr and "did you mean 'learning_rate'?" in run.stderr


@pytest.mark.parametrize(
    "content,words",
    [
        ("lora_r: eight\n", ["lora_r", "integer", "'eight'"]),
        ("load_in_4bit: maybe\n", ["load_in_4bit", "true or false"]),
        ("lr_scheduler_type: cosin\n", ["lr_scheduler_type", "did you mean 'cosine'"]),
        ("- just\n- a list\n", ["mapping"]),
        ("lora_r: [1\n", ["not valid YAML", "line"]),
    ],
)
def test_bad_config_values_are_one_line_errors(tmp_path, content, words):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    run = swiftune("train", "--config", config, "--print-config")
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    for word in words:
        assert word in run.stderr


def test_missing_config_file(tmp_path):
    run = swiftune("train", "--config", tmp_path / "none.yaml", "--print-config")
    assert run.returncode == 1 and "does not exist" in run.stderr


@pytest.mark.parametrize(
    "argv", [["train", "--lora-r", "x"], ["train", "--dtype", "float8"], ["export", "--bogus"], ["fly"], []]
)
def test_usage_errors_exit_2_with_one_line(argv):
    run = swiftune(*argv)
    assert run.returncode == 2
    if argv:
        assert run.stderr.count("\n") == 1 and "--help" in run.stderr, run.stderr


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--load-in-4bit", "--load-in-8bit"], "Choose one of load_in_4bit and load_in_8bit"),
        (["--full-finetuning", "--load-in-4bit"], "cannot use quantized weights"),
        (["--max-steps", "-1", "--epochs", "0"], "Nothing to train"),
        (["--lora-dropout", "1.5"], "lora_dropout must be in [0, 1)"),
    ],
)
def test_settings_that_cannot_work_together_are_refused_before_loading(tmp_path, capsys, flags, words):
    from swiftune_cli.main import main

    assert main(["train", *flags, "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_resume_alone_or_yaml_true_means_last_and_num_gpus_is_a_key(tmp_path):
    assert printed_config("--resume")["resume_from_checkpoint"] == "last"
    assert printed_config("--resume", "run/checkpoint-4")["resume_from_checkpoint"] == "run/checkpoint-4"
    config = tmp_path / "run.yaml"
    config.write_text("resume_from_checkpoint: true\nnum_gpus: 2\n")
    merged = printed_config("--config", config)
    assert merged["resume_from_checkpoint"] == "last" and merged["num_gpus"] == 2
    config.write_text("resume_from_checkpoint: false\n")
    assert printed_config("--config", config, "--num-gpus", "4") == {
        **defaults(),
        "resume_from_checkpoint": None,
        "num_gpus": 4,
    }
