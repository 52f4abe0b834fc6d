"""--dataset CSV (issue 25): images and labels listed in a CSV, with groups that never straddle the
split or the folds, given folds obeyed, inference on a CSV of image names, and one-line errors."""
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import one_line_error
from dataset import DATASETS


@pytest.fixture()
def csv_data(tmp_path):
    """60 images of 3 classes by 12 patients (5 images each), ids without extension, 3 given folds."""
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        patient = i // 5
        label = ["cat", "dog", "owl"][patient % 3]
        colour = {"cat": (200, 40, 40), "dog": (40, 200, 40), "owl": (40, 40, 200)}[label]
        noise = rng.integers(0, 40, (32, 32, 3))
        Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(root / "img" / f"{i:03d}.png")
        rows.append({"id": f"img/{i:03d}", "diagnosis": label, "patient": f"p{patient}", "fold": patient % 3})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root


def build(root, **options):
    return DATASETS.build("CSV", str(root), val_ratio=0.25, seed=0, **options)


def test_a_csv_dataset_reads_names_or_indexes_and_orders_its_classes(csv_data):
    source = build(csv_data, image_col="id", label_col="diagnosis")
    assert source.classes == ["cat", "dog", "owl"] and len(source.samples) == 60
    assert source.samples[0].path == "img/000.png" and source.samples[0].label == 0  # the extension found
    by_index = build(csv_data, image_col="0", label_col="1")
    assert [s.label for s in by_index.samples] == [s.label for s in source.samples]
    frame = pd.read_csv(csv_data / "train.csv")
    frame["diagnosis"] = frame.index % 12  # numeric labels: numeric order, 10 after 9
    frame.to_csv(csv_data / "numbers.csv", index=False)
    assert build(csv_data, labels="numbers.csv", label_col="diagnosis").classes[-3:] == ["9", "10", "11"]


def test_groups_never_straddle_the_split_or_the_folds(csv_data):
    source = build(csv_data, label_col="diagnosis", group_col="patient")
    train, val = source.split()
    patients = [s.person for s in source.samples]
    assert not {patients[i] for i in train} & {patients[i] for i in val} and val
    for train, val in source.folds(4):
        assert not {patients[i] for i in train} & {patients[i] for i in val}
    plain = build(csv_data, label_col="diagnosis")  # without groups: images split, not patients
    train, val = plain.split()
    assert {patients[i] for i in train} & {patients[i] for i in val}


def test_given_folds_are_obeyed(csv_data):
    source = build(csv_data, label_col="diagnosis", fold_col="fold")
    folds = pd.read_csv(csv_data / "train.csv")["fold"].to_numpy()
    for k, (train, val) in enumerate(source.folds(3)):
        assert (folds[val] == k).all() and (folds[train] != k).all()
    train, val = source.split()  # one split: the first fold held out
    assert (folds[val] == 0).all() and len(train) + len(val) == 60
    with pytest.raises(Exception, match="holds 3 folds"):
        source.folds(5)


@pytest.mark.parametrize("change,needle", [
    (lambda f: f.assign(id=f["id"].where(f.index != 4, "img/nope")), "row 6: no image 'img/nope'"),
    (lambda f: f.assign(diagnosis=f["diagnosis"].where(f.index != 2, "")), "row 4: no label"),
    (lambda f: pd.concat([f, f.iloc[[7]]]), "both name img/007.png"),
    (lambda f: f.assign(id=f["id"].where(f.index != 1, "../../etc/passwd")), "leaves"),
])
def test_csv_mistakes_are_one_line(csv_data, tmp_path, run_here, change, needle):
    change(pd.read_csv(csv_data / "train.csv")).to_csv(csv_data / "bad.csv", index=False)
    result = run_here("train.py", "--dataset", "CSV", "--data_dir", csv_data, "--labels", "bad.csv", "--label_col",
                      "diagnosis", "--model_dir", tmp_path / "runs", "--num_workers", "0", cwd=tmp_path, check=False)
    one_line_error(result, needle)
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")


def test_a_missing_column_names_the_flag(csv_data, tmp_path, run_here):
    result = run_here("train.py", "--dataset", "CSV", "--data_dir", csv_data, "--label_col", "nosuch",
                      "--model_dir", tmp_path, cwd=tmp_path, check=False)
    one_line_error(result, "no column 'nosuch' (--label_col)")


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_a_grouped_csv_run_trains_and_predicts_a_csv_of_names(csv_data, tmp_path, run_here):
    run_here("train.py", "--dataset", "CSV", "--data_dir", csv_data, "--label_col", "diagnosis", "--group_col",
             "patient", "--model", "BaseModel", "--resize", "32,32", "--epochs", "2", "--name", "c", "--model_dir",
             tmp_path / "runs", "--num_workers", "0", cwd=tmp_path)
    split = pd.read_csv(tmp_path / "runs" / "c" / "split.csv")
    assert (split.groupby("person")["side"].nunique() == 1).all()  # split.csv names the groups
    run_here("train.py", "--dataset", "CSV", "--data_dir", csv_data, "--label_col", "diagnosis", "--fold_col", "fold",
             "--kfold", "3", "--model", "BaseModel", "--resize", "32,32", "--epochs", "1", "--name", "k",
             "--model_dir", tmp_path / "runs", "--num_workers", "0", cwd=tmp_path)
    oof = pd.read_csv(tmp_path / "runs" / "k" / "oof.csv")
    given = pd.read_csv(csv_data / "train.csv").set_index("id")["fold"]
    assert all(given[p.rsplit(".", 1)[0]] + 1 == f for p, f in zip(oof["path"], oof["fold"]))
    pd.DataFrame({"image_id": [f"img/{i:03d}" for i in range(10)]}).to_csv(tmp_path / "test.csv", index=False)
    run_here("inference.py", "--model_dir", tmp_path / "runs" / "c", "--data_dir", csv_data, "--csv",
             tmp_path / "test.csv", "--output", tmp_path / "sub.csv", "--num_workers", "0", cwd=tmp_path)
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert list(sub["image_id"]) == [f"img/{i:03d}" for i in range(10)]
    assert sub["class_name"].isin(["cat", "dog", "owl"]).all() and sub["ans"].between(0, 2).all()
