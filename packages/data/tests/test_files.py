import pytest

from swiftune_data import load_dataset_file

ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_file_type_loads(tmp_path, suffix):
    import datasets

    path = tmp_path / f"rows{suffix}"
    source = datasets.Dataset.from_list(ROWS)
    {".jsonl": source.to_json, ".json": source.to_json, ".csv": source.to_csv, ".parquet": source.to_parquet}[suffix](
        str(path)
    )
    assert load_dataset_file(path).to_list() == ROWS


def test_text_file_gives_one_row_per_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\nsecond line\n")
    assert load_dataset_file(path)["text"] == ["first line", "second line"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset_file(tmp_path / "missing.jsonl")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_dataset_file(tmp_path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    with pytest.raises(ValueError, match="use one of"):
        load_dataset_file(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="holds no rows|Could not parse"):
        load_dataset_file(path)


def test_broken_json(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a",\n')
    with pytest.raises(ValueError, match="Could not parse"):
        load_dataset_file(path)
