"""The mirror check (maskcls/mirror.py): where mirroring changes what sets the classes apart
(left and right arrows, digits) train.py turns its pipeline's default flip off and says so; where
it does not (faces, a centred shape), or nothing can be concluded (texture), the flip stays."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import FAST
from maskcls.mirror import MIN_SAME, class_signal_agreement, flips_keep_labels


def arrow(direction, rng, size=32):
    """A noisy left- or right-pointing wedge, jittered in place."""
    image = rng.normal(120, 25, (size, size))
    dy, dx = rng.integers(-3, 4, 2)
    for x in range(6, size - 6):
        half = (x - 6) // 2 if direction == "right" else (size - 7 - x) // 2
        image[size // 2 - half + dy:size // 2 + half + 1 + dy, x + dx] += 100
    return np.clip(image, 0, 255)


def shape(kind, rng, size=32):
    """A noisy centred disc or ring: left-right symmetric."""
    yy, xx = np.mgrid[:size, :size] - size / 2 + rng.integers(-2, 3, 2)[:, None, None]
    radius = np.hypot(yy, xx)
    mask = radius < 9 if kind == "disc" else (radius > 6) & (radius < 10)
    return np.clip(rng.normal(120, 25, (size, size)) + 100 * mask, 0, 255)


def test_mirrored_classes_are_told_apart_from_symmetric_ones_and_from_texture():
    rng = np.random.default_rng(0)
    labels = np.arange(80) % 2
    arrows = np.stack([arrow(("left", "right")[y], rng) for y in labels])
    same, mirrored = class_signal_agreement(arrows, labels)
    assert same > 0.6 and mirrored < -0.5  # each class is the other's mirror image
    shapes = np.stack([shape(("disc", "ring")[y], rng) for y in labels])
    same, mirrored = class_signal_agreement(shapes, labels)
    assert same > 0.6 and mirrored > 0.8 * same
    same, _ = class_signal_agreement(rng.normal(size=(80, 32, 32)), labels)  # no layout to compare
    assert same < MIN_SAME


def write_folders(root, make, kinds, per_class=24, seed=0):
    rng = np.random.default_rng(seed)
    for kind in kinds:
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(make(kind, rng).astype(np.uint8)).convert("RGB").save(root / kind / f"{i}.png")
    return root


def test_flips_keep_labels_reads_the_files(tmp_path):
    arrows = write_folders(tmp_path / "arrows", arrow, ("left", "right"))
    paths = sorted(str(p) for p in arrows.rglob("*.png"))
    keeps, same, mirrored = flips_keep_labels(paths, [p.split("/")[-2] == "right" for p in paths])
    assert keeps is False and mirrored < 0.5 * same
    shapes = write_folders(tmp_path / "shapes", shape, ("disc", "ring"))
    paths = sorted(str(p) for p in shapes.rglob("*.png"))
    assert flips_keep_labels(paths, [p.split("/")[-2] == "ring" for p in paths])[0] is True
    (tmp_path / "arrows" / "left" / "0.png").write_bytes(b"not an image")  # left out, not fatal
    paths = sorted(str(p) for p in arrows.rglob("*.png"))
    assert flips_keep_labels(paths, [p.split("/")[-2] == "right" for p in paths])[0] is False


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_train_turns_the_default_flip_off_where_it_changes_the_class(tmp_path, run_here):
    arrows = write_folders(tmp_path / "arrows", arrow, ("left", "right"))
    shapes = write_folders(tmp_path / "shapes", shape, ("disc", "ring"))
    common = [*FAST, "--resize", "32,32", "--dataset", "ImageFolder", "--epochs", "1", "--model_dir", tmp_path / "runs"]

    def config(name):
        return json.loads((tmp_path / "runs" / name / "config.json").read_text())
    out = run_here("train.py", *common, "--data_dir", arrows, "--name", "arrows").stdout
    assert "note: no horizontal flips (--hflip 0): mirroring changes what sets these classes apart" in out
    assert config("arrows")["hflip"] == 0.0
    out = run_here("train.py", *common, "--data_dir", arrows, "--hflip", "0.5", "--name", "asked").stdout
    assert "no horizontal flips" not in out and config("asked")["hflip"] == 0.5  # the user's word wins
    out = run_here("train.py", *common, "--data_dir", shapes, "--name", "shapes").stdout
    assert "no horizontal flips" not in out and config("shapes")["hflip"] is None  # the pipeline's own flip
