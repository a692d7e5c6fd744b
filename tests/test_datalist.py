"""The data contract: a valid datalist loads; every bad item fails with one line naming it."""

import json

import nibabel as nib
import numpy as np
import pytest

from common.data import load_datalist
from common.errors import DatalistError


@pytest.fixture
def dataset(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "img" / f"{i}.nii.gz")
    items = [{"image": f"img/{i}.nii.gz", "label": i % 2} for i in range(3)]
    return tmp_path, items


def _write(root, content):
    path = root / "datalist.json"
    path.write_text(json.dumps(content))
    return path


def _one_line_error(datalist, **kwargs) -> str:
    with pytest.raises(DatalistError) as info:
        load_datalist(datalist, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_datalist_resolves_paths(dataset):
    root, items = dataset
    loaded = load_datalist(_write(root, {"training": items, "test": items[:1]}), "training")
    assert [item["label"] for item in loaded] == [0, 1, 0]
    assert loaded[0]["image"] == str((root / "img" / "0.nii.gz").resolve())
    # The same datalist from elsewhere with an explicit dataset folder.
    moved = root / "lists"
    moved.mkdir()
    (moved / "dl.json").write_text(json.dumps({"training": items}))
    assert load_datalist(moved / "dl.json", dataset_dir=root)[2]["image"].endswith("img/2.nii.gz")


def test_missing_file_names_the_item(dataset):
    root, items = dataset
    items[1]["image"] = "img/missing.nii.gz"
    message = _one_line_error(_write(root, {"training": items}))
    assert "training[1] (img/missing.nii.gz)" in message and "file not found" in message


def test_unreadable_file_names_the_item(dataset):
    root, items = dataset
    (root / "img" / "broken.nii.gz").write_bytes(b"this is not a NIfTI file at all" * 20)
    items[2]["image"] = "img/broken.nii.gz"
    message = _one_line_error(_write(root, {"training": items}))
    assert "training[2] (img/broken.nii.gz)" in message and "unreadable NIfTI" in message


def test_non_nifti_name(dataset):
    root, items = dataset
    (root / "img" / "scan.png").write_bytes(b"\x89PNG")
    items[0]["image"] = "img/scan.png"
    assert "not a NIfTI file name" in _one_line_error(_write(root, {"training": items}))


def test_bad_label_names_the_item(dataset):
    root, items = dataset
    items[0]["label"] = 3
    message = _one_line_error(_write(root, {"training": items}))
    assert "training[0] (img/0.nii.gz)" in message and "label 3 is outside the allowed set" in message
    items[0]["label"] = "AD"
    assert "is not a number" in _one_line_error(_write(root, {"training": items}))
    # Regression targets accept any number when no label set is imposed.
    items[0]["label"] = 71.5
    assert load_datalist(_write(root, {"training": items}), allowed_labels=None)[0]["label"] == 71.5


def test_missing_key_names_the_item(dataset):
    root, items = dataset
    del items[1]["label"]
    message = _one_line_error(_write(root, {"training": items}))
    assert "training[1]" in message and "missing key(s) ['label']" in message


def test_optional_path_keys_are_checked(dataset):
    root, items = dataset
    items[0]["mask"] = "img/no_mask.nii.gz"
    message = _one_line_error(_write(root, {"training": items}))
    assert "'mask'" in message and "no_mask.nii.gz" in message


def test_empty_or_missing_split(dataset):
    root, items = dataset
    datalist = _write(root, {"training": items, "validation": []})
    assert "split 'validation' is empty" in _one_line_error(datalist, split="validation")
    assert "no 'test' split" in _one_line_error(datalist, split="test")


def test_not_json(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text("{'training': [")
    assert "not valid JSON" in _one_line_error(path)
    assert "datalist file not found" in _one_line_error(tmp_path / "absent.json")
