from swiftune_cli.main import main


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


def test_debug_shows_the_traceback_instead_of_one_line(tmp_path):
    import pytest

    for argv in (["--debug", "train"], ["train", "--debug"]):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            main([*argv, "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "out")])


def test_unexpected_errors_name_their_type_and_the_debug_flag():
    from swiftune_cli.main import error_sentence

    assert error_sentence(ValueError("Bad value;\n  fix it.")) == "Bad value; fix it."
    assert error_sentence(RuntimeError("CUDA out of memory")) == (
        "RuntimeError: CUDA out of memory (run with --debug for the traceback)"
    )
