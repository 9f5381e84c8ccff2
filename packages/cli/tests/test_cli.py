import subprocess
import sys

import pytest

from swiftune_cli.main import main


def test_help_imports_no_torch():
    code = (
        "import sys\nfrom swiftune_cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'swiftune --help imported torch'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "train" in run.stdout and "export" in run.stdout


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("swiftune 0.")


def test_missing_model_is_one_clear_line(tmp_path, capsys):
    rc = main(["train", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_dataset_is_one_clear_line(tmp_path, capsys):
    rc = main(["train", "--data", str(tmp_path / "none.jsonl"), "--output-dir", str(tmp_path / "out")])
    assert rc == 1 and "Dataset file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    target = tmp_path / "out"
    target.write_text("keep")
    assert main(["train", "--output-dir", str(target)]) == 1
    assert "existing file" in capsys.readouterr().err and target.read_text() == "keep"


def test_export_of_missing_adapter(tmp_path, capsys):
    assert main(["export", "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "merged")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("argv", [["train", "--max-steps", "x"], ["export", "--bogus"], ["fly"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
