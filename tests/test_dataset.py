"""Reading the layouts, the label scheme and the splits."""
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dataset import DATASETS, read_eval_dir, read_mask_train
import dataset
from maskcls import labels
from maskcls.cli import UserError
from maskcls import images
from maskcls.images import load_image
from maskcls.labels import MASK_CLASSES, NUM_CLASSES, age_band, decode_label, encode_label

SHARED_META = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mask_train_meta.csv")


@pytest.mark.parametrize("age,band", [(18, 0), (29, 0), (30, 1), (45, 1), (59, 1), (60, 2), (61, 2)])
def test_age_band_edges(age, band):
    assert age_band(age) == band


def test_encode_decode_round_trip():
    assert NUM_CLASSES == 18 and len(MASK_CLASSES) == 18
    for label in range(NUM_CLASSES):
        assert encode_label(*decode_label(label)) == label
    assert encode_label(0, 0, 0) == 0
    assert encode_label(2, 1, 2) == 17
    assert encode_label(1, 1, age_band(30)) == 10  # incorrect, female, 30..59
    assert MASK_CLASSES[10] == "incorrect/F/30-59"
    assert decode_label(13) == (2, 0, 1)


def test_read_sample_layout(sample_data):
    root, samples = read_mask_train(str(sample_data / "train"))
    meta = pd.read_csv(sample_data / "train" / "train.csv", dtype=str)
    assert len(samples) == 7 * len(meta)
    assert len({s.person for s in samples}) == len(meta)
    assert all(not os.path.basename(s.path).startswith(".") for s in samples)  # ._mask1.jpg skipped
    # labels agree with the folder names
    for s in samples[:50]:
        mask, gender, age = decode_label(s.label)
        _, gender_name, _, age_text = s.person.rsplit("_", 3)
        assert gender == (gender_name == "female") and age == age_band(int(age_text))
        stem = os.path.splitext(os.path.basename(s.path))[0]
        assert mask == labels.PHOTO_MASK[stem]


def test_images_folder_accepted_as_data_dir(sample_data):
    root, _ = read_mask_train(str(sample_data / "train" / "images"))
    assert os.path.samefile(root, sample_data / "train")


@pytest.fixture
def broken_copy(sample_data, tmp_path):
    copy = tmp_path / "train"
    shutil.copytree(sample_data / "train", copy)
    return copy


def _first_person(train_dir):
    return pd.read_csv(train_dir / "train.csv", dtype=str)["path"][0]


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_mask_train(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no train.csv"):
        read_mask_train(str(tmp_path))


def test_missing_person_folder(broken_copy):
    person = _first_person(broken_copy)
    shutil.rmtree(broken_copy / "images" / person)
    with pytest.raises(UserError, match=person):
        read_mask_train(str(broken_copy))


def test_missing_photo(broken_copy):
    folder = broken_copy / "images" / _first_person(broken_copy)
    for f in folder.glob("normal.*"):
        f.unlink()
    with pytest.raises(UserError, match="missing photo.*normal"):
        read_mask_train(str(broken_copy))


def test_unknown_photo(broken_copy):
    folder = broken_copy / "images" / _first_person(broken_copy)
    Image.new("RGB", (4, 4)).save(folder / "selfie.jpg")
    with pytest.raises(UserError, match="unknown photo.*selfie.jpg"):
        read_mask_train(str(broken_copy))


def test_bad_age_and_gender_and_column(broken_copy):
    csv_path = broken_copy / "train.csv"
    meta = pd.read_csv(csv_path, dtype=str)
    meta.loc[3, "age"] = "forty"
    meta.to_csv(csv_path, index=False)
    with pytest.raises(UserError, match="row 5: bad age 'forty'"):
        read_mask_train(str(broken_copy))
    meta.loc[3, "age"] = "40"
    meta.loc[2, "gender"] = "x"
    meta.to_csv(csv_path, index=False)
    with pytest.raises(UserError, match="row 4: bad gender"):
        read_mask_train(str(broken_copy))
    meta.drop(columns=["age"]).to_csv(csv_path, index=False)
    with pytest.raises(UserError, match="missing column.*age"):
        read_mask_train(str(broken_copy))


def _person_sets(source, train, val):
    return {source.samples[i].person for i in train}, {source.samples[i].person for i in val}


@pytest.mark.parametrize("name", ["MaskSplitByProfileDataset", "datasetSplitByClasses"])
def test_person_splits_do_not_leak(sample_data, name):
    source = DATASETS.build(name, str(sample_data / "train"), val_ratio=0.2, seed=3)
    train, val = source.split()
    assert sorted(train + val) == list(range(len(source.samples)))
    train_people, val_people = _person_sets(source, train, val)
    assert not train_people & val_people
    assert len(val_people) == pytest.approx(0.2 * len(train_people | val_people), abs=1)
    assert source.split() == (train, val)  # same seed, same split
    other = DATASETS.build(name, str(sample_data / "train"), val_ratio=0.2, seed=4).split()
    assert other != (train, val)


def test_stratified_by_gender_and_age(sample_data):
    source = DATASETS.build("datasetSplitByClasses", str(sample_data / "train"), val_ratio=0.5, seed=0)
    train, val = source.split()
    # every gender x age cell holds >= 2 people in the sample, so each side gets one
    cells = lambda idx: {source.samples[i].label % 6 for i in idx}  # noqa: E731
    assert cells(train) == cells(val) == set(range(6))


def test_random_image_split_is_the_documented_leak(sample_data):
    source = DATASETS.build("MaskBaseDataset", str(sample_data / "train"), val_ratio=0.3, seed=0)
    train, val = source.split()
    assert "leak" in type(source).__doc__
    assert len(val) == pytest.approx(0.3 * len(source.samples), abs=1)
    train_people, val_people = _person_sets(source, train, val)
    assert train_people & val_people  # people on both sides: why it is not the default


def test_write_split_csv(sample_data, tmp_path):
    source = DATASETS.build("datasetSplitByClasses", str(sample_data / "train"))
    train, val = source.split()
    dataset.write_split_csv(tmp_path / "split.csv", source, train, val)
    split = pd.read_csv(tmp_path / "split.csv", dtype=str, keep_default_na=False)
    assert list(split.columns) == ["path", "person", "side"]
    assert len(split) == len(source.samples)
    assert set(split["side"]) == {"train", "val"}
    sides = split.groupby("person")["side"].nunique()
    assert (sides == 1).all()
    assert all(os.path.isfile(sample_data / "train" / p) for p in split["path"])


def _image_folder(root, classes=("cat", "dog", "owl"), per_class=6):
    for c, name in enumerate(classes):
        os.makedirs(root / name / "sub", exist_ok=True)
        for i in range(per_class):
            where = root / name / ("sub" if i % 2 else "")
            Image.new("RGB", (20, 16), (40 * c, 10 * i, 0)).save(where / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_dataset(tmp_path):
    root = _image_folder(tmp_path / "folders")
    source = DATASETS.build("ImageFolder", str(root), val_ratio=0.5, seed=0)
    assert source.classes == ["cat", "dog", "owl"]
    assert len(source.samples) == 18 and all(s.person == "" for s in source.samples)
    train, val = source.split()
    assert sorted(np.bincount(source.labels(val))) == [3, 3, 3]  # class-stratified
    assert source.mean == dataset.IMAGENET_MEAN


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no class folders"):
        DATASETS.build("ImageFolder", str(tmp_path))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        DATASETS.build("ImageFolder", str(tmp_path))


def test_load_image_modes(tmp_path):
    """Grayscale, RGBA and palette images come back as RGB; EXIF rotation is applied."""
    Image.new("L", (8, 6), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (8, 6), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    Image.new("P", (8, 6)).save(tmp_path / "palette.png")
    for name in ("gray.png", "rgba.png", "palette.png"):
        image = load_image(tmp_path / name)
        assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees to show upright
    Image.new("RGB", (40, 20)).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").shape == (40, 20, 3)
    assert load_image(tmp_path / "rot.jpg", min_size=(8, 4)).shape[:2] in ((40, 20), (20, 10), (10, 5))


def test_corrupt_image_is_named(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(UserError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg")


def test_reduced_jpeg_decode_is_at_least_the_asked_size(sample_data):
    path = next((sample_data / "train" / "images").glob("*/mask1.jpg"))
    full = load_image(path)
    small = load_image(path, min_size=(128, 96))
    assert full.shape == (512, 384, 3)
    assert small.shape[0] >= 128 and small.shape[1] >= 96 and small.shape[0] < 512


def test_opencv_decode_gives_pils_pixels_and_keeps_its_refusals(sample_data, tmp_path, monkeypatch):
    """Colour JPEGs decode with OpenCV (faster): the same pixels as PIL at every reduced scale and
    crop; a JPEG cut short, greyscale or rotated, and every other format (PNGs of every kind) go to
    PIL."""
    photos = sorted((sample_data / "train" / "images").glob("*/*.jp*g"))[:12]
    photos += sorted((sample_data / "train" / "images").glob("*/*.png"))[:4]
    assert len(photos) == 16
    odd = tmp_path / "odd.jpg"  # odd sides: the reduced sizes round up
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 101, 3), dtype=np.uint8)).save(odd, quality=90)
    cases = [(None, None), ((224, 224), None), ((128, 96), None), ((64, 48), None), ((16, 12), None),
             ((64, 48), (40, 60, 300, 420)), (None, (10, 20, 200, 300))]
    calls = []
    real = images.decode_opencv
    monkeypatch.setattr(images, "decode_opencv", lambda *a: calls.append(1) or real(*a))
    fast = {(p, c): load_image(p, *c) for p in [*photos, odd] for c in cases if p != odd or c[1] is None}
    assert len(calls) == len(fast)
    monkeypatch.setattr(images, "decode_opencv", lambda *a: None)  # PIL alone
    for (path, case), pixels in fast.items():
        assert np.array_equal(pixels, load_image(path, *case)), (path.name, case)
    monkeypatch.setattr(images, "decode_opencv", real)
    with Image.open(photos[0]) as img:  # the OpenCV path served them (None: PIL's)
        assert images.decode_opencv(photos[0].read_bytes(), img, *img.size) is not None
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photos[0].read_bytes()[:-2000])  # no end-of-image marker: PIL decodes, and refuses it
    with Image.open(cut) as img:
        assert images.decode_opencv(cut.read_bytes(), img, *img.size) is None
    with pytest.raises(UserError, match="cut.jpg"):
        load_image(cut)
    Image.new("L", (8, 6), 77).save(tmp_path / "grey.jpg")
    with Image.open(tmp_path / "grey.jpg") as img:
        assert images.decode_opencv((tmp_path / "grey.jpg").read_bytes(), img, 8, 6) is None
    assert load_image(tmp_path / "grey.jpg").shape == (6, 8, 3)
    png = next(p for p in photos if p.suffix == ".png")
    with Image.open(png) as img:
        assert images.decode_opencv(png.read_bytes(), img, *img.size) is None


def test_eval_dir(sample_data, tmp_path):
    eval_set = read_eval_dir(str(sample_data / "eval"))
    info = pd.read_csv(sample_data / "eval" / "info.csv")
    assert eval_set.image_ids == info["ImageID"].tolist()
    assert all(os.path.isfile(p) for p in eval_set.paths)
    # a plain folder of images: ids are relative paths
    root = _image_folder(tmp_path / "plain")
    plain = read_eval_dir(str(root))
    assert plain.info is None and "cat/0.png" in plain.image_ids and "cat/sub/1.png" in plain.image_ids


@pytest.mark.parametrize("image_id,message", [("../escape.jpg", "outside"), ("/etc/passwd", "outside"),
                                              ("missing.jpg", "missing")])
def test_eval_dir_refuses(tmp_path, image_id, message):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "ok.jpg")
    pd.DataFrame({"ImageID": ["ok.jpg", image_id], "ans": [0, 0]}).to_csv(tmp_path / "info.csv", index=False)
    with pytest.raises(UserError, match=message):
        read_eval_dir(str(tmp_path))


def test_eval_dir_refuses_duplicates(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "ok.jpg")
    pd.DataFrame({"ImageID": ["ok.jpg", "ok.jpg"], "ans": [0, 0]}).to_csv(tmp_path / "info.csv", index=False)
    with pytest.raises(UserError, match="more than once"):
        read_eval_dir(str(tmp_path))


@pytest.mark.skipif(not os.path.isfile(SHARED_META), reason=f"real metadata not found at {SHARED_META} "
                                                            "(../shared is absent in this checkout)")
def test_all_real_people_parse_and_split_without_leak(tmp_path):
    """All 2,700 people of the real metadata (tiny placeholder photos): ids as strings, the shared
    id, suffixed ids; the person split never puts one person on both sides."""
    meta = pd.read_csv(SHARED_META, dtype=str, keep_default_na=False)
    assert len(meta) == 2700
    train = tmp_path / "train"
    (train / "images").mkdir(parents=True)
    meta.to_csv(train / "train.csv", index=False)
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.jpg")
    tiny = (tmp_path / "tiny.jpg").read_bytes()
    for folder in meta["path"]:
        os.mkdir(train / "images" / folder)
        for stem in labels.PHOTO_MASK:
            (train / "images" / folder / f"{stem}.jpg").write_bytes(tiny)
    source = DATASETS.build("datasetSplitByClasses", str(train), val_ratio=0.2, seed=0)
    assert len(source.samples) == 18900
    assert len({s.person for s in source.samples}) == 2700  # a person is a folder, not an id
    counts = np.bincount([decode_label(s.label)[2] for s in source.samples[::7]], minlength=3)
    assert counts.tolist() == [1281, 1227, 192]
    train_idx, val_idx = source.split()
    train_people = {source.samples[i].person for i in train_idx}
    val_people = {source.samples[i].person for i in val_idx}
    assert not train_people & val_people
    assert len(val_people) == 540
