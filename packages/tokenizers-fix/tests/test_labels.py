import pytest
import torch

from swiftune_tokenizers_fix import check_labels


def test_every_label_masked_is_an_error():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}] * 3
    with pytest.raises(ValueError, match="Every one of the 9 labels is -100"):
        check_labels(rows)


def test_mostly_masked_labels_warn_in_one_line(repair_log):
    rows = [{"labels": [-100] * 19 + [7]}, {"labels": [-100] * 20}]
    assert check_labels(rows) == pytest.approx(39 / 40)
    (line,) = repair_log()
    assert line.startswith("labels: 97.5% of the 40 labels are -100")


def test_healthy_labels_pass_silently(repair_log):
    batch = {"labels": torch.tensor([[-100, -100, 5, 6], [-100, 8, 9, -100]])}
    assert check_labels(batch) == 0.5
    assert repair_log() == []


class _Columns:
    """What check_labels uses of a datasets.Dataset (not a dependency here): column names and column reads."""

    def __init__(self, **columns):
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, name):
        return self.columns[name]

    def __iter__(self):
        raise AssertionError("a dataset with columns is read by column, not row by row")


def test_dataset_columns_are_read_at_once(repair_log):
    dataset = _Columns(input_ids=[[1, 2], [3, 4]], labels=[[-100, 2], [-100, -100]])
    assert check_labels(dataset) == 0.75 and repair_log() == []
    with pytest.raises(ValueError, match="no 'labels'"):
        check_labels(_Columns(input_ids=[[1, 2]]))


def test_missing_or_empty_labels_are_errors():
    with pytest.raises(ValueError, match="no 'labels'"):
        check_labels([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="no labels at all"):
        check_labels([])
