"""The prepared-image store that outlives a run (issue 24): the same pixels as decoding on every
path, a changed photo prepared again, two processes filling it at once, a full disk refused
cleanly, and a second run that decodes nothing."""
import contextlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, ROOT
from maskcls import images
from maskcls.images import ImageDataset, PreparedStore, load_image, open_store, prepare_image


def identity(image, **kwargs):
    return {"image": image}


@pytest.fixture()
def photos(tmp_path):
    """Photos of the kinds the readers handle: JPEG (decoded at a reduced scale), PNG with alpha,
    greyscale, 16-bit greyscale, and an EXIF-rotated JPEG."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = []
    base = (rng.random((256, 192, 3)) * 255).astype(np.uint8)
    Image.fromarray(base).save(folder / "a.jpg", quality=90)
    Image.fromarray(np.dstack([base, base[..., :1]])).save(folder / "b.png")
    Image.fromarray(base[..., 0]).save(folder / "c.png")
    Image.fromarray((base[..., 0].astype(np.uint16) * 257)).save(folder / "d.png")
    rotated = Image.fromarray(base)
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(folder / "e.jpg", exif=exif)
    paths = [str(folder / n) for n in ("a.jpg", "b.png", "c.png", "d.png", "e.jpg")]
    return paths


@pytest.mark.parametrize("region", [None, (20, 30, 150, 200)])
def test_the_store_gives_the_pixels_decoding_gives(photos, tmp_path, region):
    size = (64, 48)
    direct = [prepare_image(load_image(p, size, region), size) for p in photos]
    store = PreparedStore(str(tmp_path / "store"))
    regions = [region] * len(photos) if region else None
    first = ImageDataset(photos, [0] * len(photos), identity, prepare_to=size, regions=regions, store=store)
    assert all(np.array_equal(first[i][0], direct[i]) for i in range(len(photos)))  # filled on a miss
    later = ImageDataset(photos, [0] * len(photos), identity, prepare_to=size, regions=regions,
                         store=PreparedStore(str(tmp_path / "store")))
    reads = []
    with _counting(reads):
        assert all(np.array_equal(later[i][0], direct[i]) for i in range(len(photos)))  # read back
    assert reads == []  # nothing decoded the second time
    other = ImageDataset(photos, [0] * len(photos), identity, prepare_to=(32, 24), regions=regions,
                         store=PreparedStore(str(tmp_path / "store")))
    assert other[0][0].shape == (32, 24, 3)  # another size is another entry


@contextlib.contextmanager
def _counting(reads):
    real = images.load_image

    def counted(path, *args, **kwargs):
        reads.append(path)
        return real(path, *args, **kwargs)
    images.load_image = counted
    try:
        yield
    finally:
        images.load_image = real


def test_a_changed_photo_is_prepared_again(photos, tmp_path):
    size = (64, 48)
    store = PreparedStore(str(tmp_path / "store"))
    before, hit = store.read(photos[1], size, None)
    assert not hit and store.read(photos[1], size, None)[1]
    Image.new("RGB", (192, 256), (10, 200, 30)).save(photos[1])  # the same name, another picture
    after, hit = store.read(photos[1], size, None)
    assert not hit and np.array_equal(after, prepare_image(load_image(photos[1], size), size))
    assert not np.array_equal(before, after)


def test_a_damaged_entry_is_prepared_again(photos, tmp_path):
    store = PreparedStore(str(tmp_path / "store"))
    image, _ = store.read(photos[0], (64, 48), None)
    with open(photos[0], "rb") as f:
        key = store.key(f.read(), (64, 48), None)
    assert np.array_equal(np.load(key), image)  # an entry is a .npy file
    with open(key, "r+b") as f:
        f.truncate(40)  # cut short, as by a crash of an older writer
    again, hit = store.read(photos[0], (64, 48), None)
    assert not hit and np.array_equal(again, image)
    assert store.read(photos[0], (64, 48), None)[1]  # rewritten
    for damaged in (np.zeros((64, 48, 3), np.float32), np.zeros((48, 64, 3), np.uint8)):  # not what it must hold
        np.save(key, damaged)
        again, hit = store.read(photos[0], (64, 48), None)
        assert not hit and np.array_equal(again, image)
    with open(key, "ab") as f:
        f.write(b"\0")  # longer than an entry
    assert not store.read(photos[0], (64, 48), None)[1]


FILL = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from maskcls.images import PreparedStore
    store = PreparedStore({store!r})
    paths = {paths!r}
    for _ in range(20):
        for p in paths:
            store.read(p, (64, 48), None)
""")


def test_two_processes_fill_the_store_at_once(photos, tmp_path):
    script = FILL.format(root=ROOT, store=str(tmp_path / "store"), paths=photos)
    workers = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    store = PreparedStore(str(tmp_path / "store"))
    for path in photos:
        image, hit = store.read(path, (64, 48), None)
        assert hit and np.array_equal(image, prepare_image(load_image(path, (64, 48)), (64, 48)))
    leftovers = [n for d, _, names in os.walk(tmp_path / "store") for n in names if ".tmp" in n]
    assert leftovers == []


@pytest.fixture()
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_short_disk_is_refused_in_one_line_and_a_full_one_stops_the_writing(photos, small_disk, capsys):
    assert open_store(str(small_disk / "store"), 10_000, (224, 224)) is None
    assert "no prepared-image cache" in capsys.readouterr().out
    store = open_store(str(small_disk / "store"), 1, (64, 48))
    with open(small_disk / "filler", "wb") as f:  # the disk fills up meanwhile
        f.write(b"\0" * (300 * 1024 - 8 * 1024))
    for path in photos:  # still prepared right, the writing stopped
        image, _ = store.read(path, (64, 48), None)
        assert np.array_equal(image, prepare_image(load_image(path, (64, 48)), (64, 48)))
    assert not store.writing
    assert not [n for d, _, names in os.walk(small_disk) for n in names if ".tmp" in n]


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_a_second_run_decodes_nothing(work, tmp_path, run_here, monkeypatch):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)
    decoded, found = [], []  # the images the training and inference loaders decoded, or found stored
    real = images.PreparedStore.read

    def read(self, path, size, region):
        image, hit = real(self, path, size, region)
        (found if hit else decoded).append(path)
        return image, hit
    monkeypatch.setattr(images.PreparedStore, "read", read)
    args = [*FAST, "--epochs", "1", "--data_dir", data / "train", "--model_dir", tmp_path / "runs"]
    run_here("train.py", *args, "--name", "first", cwd=tmp_path)
    first = len(decoded)  # the 210 photos less those the training loader's drop_last left out
    assert first > 190 and not found and (data / "train" / ".prepared_cache").is_dir()
    decoded.clear()
    run_here("train.py", *args, "--name", "second", cwd=tmp_path)
    assert decoded == [] and len(found) == first  # every image from the store
    found.clear()
    inference = ["--model_dir", tmp_path / "runs" / "second", "--data_dir", data / "eval", "--num_workers", "0"]
    run_here("inference.py", *inference, "--output", tmp_path / "a.csv", cwd=tmp_path)
    assert len(decoded) == 70
    decoded.clear()
    run_here("inference.py", *inference, "--output", tmp_path / "b.csv", cwd=tmp_path)
    assert decoded == [] and len(found) == 70  # the eval images too
    found.clear()
    run_here("train.py", *args, "--name", "off", "--cache_dir", "none", cwd=tmp_path)
    assert decoded == found == []  # no store


def test_prepare_image_shrinks_antialiased_and_enlarges_smoothly():
    """Area interpolation enlarges like nearest neighbour (an 8x8 digit became 4x4-pixel blocks at
    32x32): enlarging is bicubic. Shrinking is antialiased bilinear, PIL's BILINEAR filter (within
    1 of its values, not the aliasing bilinear of OpenCV), on colour and greyscale, contiguous or
    a cropped view; a side that shrinks while the other grows is shrunk first."""
    import cv2
    from PIL import Image
    rng = np.random.default_rng(0)
    small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    up = prepare_image(small, (32, 32))
    assert np.array_equal(up, cv2.resize(small, (32, 32), interpolation=cv2.INTER_CUBIC))
    blocks = up.reshape(8, 4, 8, 4, 3)
    assert (blocks.max(axis=(1, 3)) != blocks.min(axis=(1, 3))).mean() > 0.9  # not 4x4 blocks of one value
    big = (rng.random((64, 48, 3)) * 255).astype(np.uint8)
    frozen = big.copy()
    frozen.flags.writeable = False  # np.asarray of a PIL image
    for image in (big, big[3:50, 5:40], big[..., 0], frozen):
        down = prepare_image(image, (23, 17))
        pil = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((17, 23), Image.BILINEAR))
        assert down.shape == pil.shape and down.dtype == np.uint8 and down.flags.writeable
        assert np.abs(down.astype(int) - pil).max() <= 1
        aliased = cv2.resize(image, (17, 23), interpolation=cv2.INTER_LINEAR)
        assert np.abs(down.astype(int) - aliased).mean() > 5 * np.abs(down.astype(int) - pil).mean()
    tall = (rng.random((100, 10, 3)) * 255).astype(np.uint8)
    mixed = prepare_image(tall, (50, 20))
    assert mixed.shape == (50, 20, 3)
    assert np.array_equal(mixed, cv2.resize(prepare_image(tall, (50, 10)), (20, 50), interpolation=cv2.INTER_CUBIC))
    assert prepare_image(big, (64, 48)) is big
