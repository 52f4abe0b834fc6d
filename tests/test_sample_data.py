"""make_sample_data.py: the competition layout, the real data's quirks and distribution, determinism."""
import csv
import hashlib
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import make_sample_data as msd
from maskcls.cli import UserError

ROOT = Path(__file__).resolve().parents[1]
PERSONS, EVAL_PERSONS = 40, 10  # >= 30 so every class exists, >= 20 so every extension case exists
STEMS = {"mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"}
FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def digest(folder):
    """Hash of every file under folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def person_folders(train):
    return [p for p in (train / "images").iterdir() if not p.name.startswith(".")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    msd.generate(out, PERSONS, EVAL_PERSONS, seed=0)
    return out


def test_train_layout(data):
    columns, rows = read_csv(data / "train" / "train.csv")
    assert columns == ["id", "gender", "race", "age", "path"]
    assert len(rows) == PERSONS
    assert sorted(p.name for p in person_folders(data / "train")) == sorted(r["path"] for r in rows)
    for row in rows:
        assert re.fullmatch(r"\d{6}(-1)?_(male|female)_Asian_\d+", row["path"]), row["path"]
        assert row["path"].endswith(f"_{row['gender']}_Asian_{row['age']}")
        assert row["race"] == "Asian"
        photos = [p for p in (data / "train" / "images" / row["path"]).iterdir() if not p.name.startswith(".")]
        assert {p.stem for p in photos} == STEMS and len(photos) == 7
    # macOS junk that readers must skip.
    assert (data / "train" / "images" / ".DS_Store").is_file()
    assert len(list((data / "train" / "images").glob("*/._mask1.jpg"))) == 1
    assert sorted(p.name for p in data.iterdir()) == ["eval", "train"], "temp folder left behind"


def test_images_size_mode_and_real_format(data):
    photos = [p for folder in person_folders(data / "train") for p in folder.iterdir() if not p.name.startswith(".")]
    photos += list((data / "eval" / "images").iterdir())
    assert len(photos) == 7 * (PERSONS + EVAL_PERSONS)
    for path in photos:
        with Image.open(path) as img:
            assert img.size == (384, 512) and img.mode == "RGB", path
            assert img.format == FORMATS[path.suffix[1:]], path


def test_mixed_extensions(data):
    per_folder = [frozenset(p.suffix[1:] for p in f.iterdir() if not p.name.startswith("."))
                  for f in person_folders(data / "train")]
    kinds = Counter(per_folder)
    for ext in FORMATS:
        assert kinds[frozenset([ext])] >= 1, f"no all-{ext} folder"
    assert kinds[frozenset(["jpg"])] > len(per_folder) / 2, "jpg should dominate"
    assert any(len(exts) > 1 for exts in per_folder), "no folder mixes extensions"


def test_quirky_ids(data):
    _, rows = read_csv(data / "train" / "train.csv")
    folder_ids = [r["path"].split("_")[0] for r in rows]
    unpadded = [r for r, f in zip(rows, folder_ids) if r["id"] == str(int(f.split("-")[0])) and r["id"] != f]
    padded = [r for r, f in zip(rows, folder_ids) if r["id"] == f and re.fullmatch(r"0\d{5}", f)]
    suffixed = [r for r, f in zip(rows, folder_ids) if r["id"] == f and f.endswith("-1")]
    assert len(unpadded) > PERSONS / 2 and padded and suffixed
    assert len(unpadded) + len(padded) + len(suffixed) == PERSONS
    by_id = defaultdict(list)
    for row in rows:
        by_id[row["id"]].append(row)
    shared = [group for group in by_id.values() if len(group) > 1]
    assert len(shared) == 1 and len(shared[0]) == 2
    a, b = shared[0]
    assert a["path"] != b["path"] and a["age"] != b["age"]


def test_ages_and_classes(data):
    _, rows = read_csv(data / "train" / "train.csv")
    ages = [int(r["age"]) for r in rows]
    assert min(ages) >= 18 and max(ages) <= 60
    cells = Counter((r["gender"], msd.age_band(int(r["age"]))) for r in rows)
    assert len(cells) == 6 and min(cells.values()) >= 2


def test_sample_persons_distribution():
    persons = msd.sample_persons(2700, np.random.default_rng(0))
    ages = np.array([p["age"] for p in persons])
    assert abs(np.mean([p["gender"] == "female" for p in persons]) - 0.614) < 0.03
    assert abs(np.mean(ages < 30) - 0.474) < 0.03
    assert abs(np.mean((ages >= 30) & (ages < 60)) - 0.454) < 0.03
    assert abs(np.mean(ages >= 60) - 0.071) < 0.02
    assert set(ages[ages >= 60]) == {60} and ages.min() >= 18
    # Not sorted by gender or age: the order is shuffled.
    assert persons[:50] != sorted(persons[:50], key=lambda p: (p["gender"], p["age"]))
    small = msd.sample_persons(30, np.random.default_rng(1))
    assert min(Counter((p["gender"], msd.age_band(p["age"])) for p in small).values()) >= 2
    assert len(msd.sample_persons(1, np.random.default_rng(0))) == 1


def test_eval_files(data):
    info_cols, info = read_csv(data / "eval" / "info.csv")
    ans_cols, answers = read_csv(data / "eval" / "answers.csv")
    assert info_cols == ans_cols == ["ImageID", "ans"]
    assert [r["ImageID"] for r in info] == [r["ImageID"] for r in answers]
    assert len(info) == 7 * EVAL_PERSONS and {r["ans"] for r in info} == {"0"}
    labels = [int(r["ans"]) for r in answers]
    assert all(0 <= y < 18 for y in labels)
    assert Counter(y // 6 for y in labels) == {0: 5 * EVAL_PERSONS, 1: EVAL_PERSONS, 2: EVAL_PERSONS}
    for row in info:
        assert re.fullmatch(r"[0-9a-f]{40}\.jpg", row["ImageID"])
    assert sorted(r["ImageID"] for r in info) == sorted(p.name for p in (data / "eval" / "images").iterdir())
    # In person order every block of 7 would read a,a,a,a,a,a+6,a+12.
    blocks = [labels[i:i + 7] for i in range(0, len(labels), 7)]
    assert not all(b == [b[0]] * 5 + [b[0] + 6, b[0] + 12] for b in blocks), "rows follow persons"


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_deterministic_by_seed(data, tmp_path):
    again = tmp_path / "again"
    msd.generate(again, PERSONS, EVAL_PERSONS, seed=0, workers=1)  # worker count must not matter
    assert digest(again) == digest(data)
    other = tmp_path / "other"
    msd.generate(other, PERSONS, EVAL_PERSONS, seed=1)
    assert (other / "train" / "train.csv").read_bytes() != (data / "train" / "train.csv").read_bytes()
    assert set(digest(other).values()).isdisjoint(
        h for name, h in digest(data).items() if not name.endswith(".csv"))


def test_generate_refuses_to_overwrite(data):
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        msd.generate(data, 2, 1)


def cli_run(*args):
    return subprocess.run([sys.executable, "make_sample_data.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_overwrite_and_bad_values(tmp_path):
    out = str(tmp_path / "d")
    first = cli_run("--out", out, "--persons", "3", "--eval-persons", "1")
    assert first.returncode == 0, first.stderr
    assert "3 train persons" in first.stdout and len(first.stdout.strip().splitlines()) == 1
    before = digest(tmp_path / "d")
    second = cli_run("--out", out, "--persons", "3", "--eval-persons", "1", "--seed", "5")
    assert second.returncode != 0
    assert len(second.stderr.strip().splitlines()) == 1 and "pass --overwrite" in second.stderr
    assert digest(tmp_path / "d") == before
    third = cli_run("--out", out, "--persons", "3", "--eval-persons", "1", "--seed", "5", "--overwrite")
    assert third.returncode == 0, third.stderr
    assert digest(tmp_path / "d") != before
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["eval", "train"]
    bad = cli_run("--out", str(tmp_path / "e"), "--persons", "0")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "--persons" in bad.stderr
    assert not (tmp_path / "e").exists()


def test_eval_persons_file(data):
    owners = read_csv(data / "eval" / "persons.csv")[1]
    answers = {r["ImageID"]: int(r["ans"]) for r in read_csv(data / "eval" / "answers.csv")[1]}
    assert sorted(r["ImageID"] for r in owners) == sorted(answers)
    by_person = defaultdict(list)
    for row in owners:
        by_person[row["person"]].append(answers[row["ImageID"]])
    assert len(by_person) == EVAL_PERSONS
    for labels in by_person.values():  # 7 photos: 5 worn, 1 incorrect, 1 without; one gender and age band
        assert sorted(y // 6 for y in labels) == [0, 0, 0, 0, 0, 1, 2] and len({y % 6 for y in labels}) == 1
