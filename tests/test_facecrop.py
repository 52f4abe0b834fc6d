"""facecrop.py: real MTCNN on a real photograph, the crop and its fallback, the box cache, batching
and the CLI end to end."""
import contextlib
import os

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image

from conftest import one_line_error, run_cli
import facecrop

SIZE = (384, 512)  # a competition photo, (width, height)


@pytest.fixture(scope="module")
def photo():
    """Grace Hopper's portrait as shipped with matplotlib (512x600): one face, cap to chin at
    about x 180..355, y 125..335 (checked by eye)."""
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as img:
        return img.convert("RGB")


def portrait(photo, shift=0, colour=(200, 200, 200)):
    """The photo shrunk onto a competition-size canvas; `shift` moves it sideways."""
    canvas = Image.new("RGB", SIZE, colour)
    canvas.paste(photo.resize((384, 450), Image.BILINEAR), (shift, 31))
    return canvas


def noise(seed, size=SIZE):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_face_box_lies_on_the_face(photo):
    box = facecrop.face_box(photo)
    assert box is not None
    x1, y1, x2, y2 = box
    center = ((x1 + x2) / 2, (y1 + y2) / 2)
    assert 235 < center[0] < 295 and 195 < center[1] < 265, box  # around the nose
    assert 130 < x2 - x1 < 240 and 150 < y2 - y1 < 260, box


def test_no_face_in_blank_or_noise():
    assert facecrop.face_box(Image.new("RGB", SIZE, (128, 128, 128))) is None
    assert facecrop.face_box(noise(0)) is None


def test_fallback_is_the_fixed_central_region():
    # 384x512: 60% of 384 = 230.4 wide around x 192, 55% of 512 = 281.6 high around y 0.42 * 512
    assert facecrop.crop_region(None, 384, 512) == (76, 74, 308, 356)
    assert facecrop.crop_region(None, 100, 100) == (20, 14, 80, 70)


def test_crop_region_grows_by_the_margin_and_clips():
    # a 100 x 200 box, margin 0.3: 30 px left and right, 60 px above and below
    assert facecrop.crop_region((100, 100, 200, 300), 384, 512, margin=0.3) == (70, 40, 230, 360)
    assert facecrop.crop_region((100, 100, 200, 300), 384, 512, margin=0) == (100, 100, 200, 300)
    # near the top-left corner and past the right edge: clipped to the image
    assert facecrop.crop_region((10, 20, 110, 120), 384, 512, margin=0.5) == (0, 0, 160, 170)
    assert facecrop.crop_region((300, 400, 400.5, 520), 384, 512, margin=0.1) == (289, 388, 384, 512)
    # fractional boxes round outwards; a box outside the image still gives a non-empty region
    assert facecrop.crop_region((10.5, 20.5, 30.2, 40.2), 384, 512, margin=0) == (10, 20, 31, 41)
    x1, y1, x2, y2 = facecrop.crop_region((500, 600, 520, 640), 384, 512, margin=0)
    assert 0 <= x1 < x2 <= 384 and 0 <= y1 < y2 <= 512


def test_crop_image_cuts_the_region(photo):
    array = np.asarray(photo)
    for image in (photo, array):
        crop = facecrop.crop_image(image, (10, 20, 110, 70))
        assert crop.shape == (50, 100, 3)
        assert np.array_equal(crop, array[20:70, 10:110])
    with pytest.raises(AssertionError, match="outside"):
        facecrop.crop_image(array, (0, 0, 600, 600))


def test_same_size_images_go_in_one_call(photo):
    images = [portrait(photo, shift) for shift in (0, -20, 20, -40)] + [noise(1)]
    calls, sent = facecrop.DETECTOR.calls, facecrop.DETECTOR.images
    batched = facecrop.detect_boxes(images)
    assert facecrop.DETECTOR.calls - calls == 1 and facecrop.DETECTOR.images - sent == 5
    one_by_one = [facecrop.face_box(image) for image in images]
    assert batched[-1] is None and one_by_one[-1] is None
    for a, b in zip(batched[:-1], one_by_one[:-1]):
        assert a is not None and np.allclose(a, b, atol=0.5), (a, b)
    # the face moves with the photo
    assert batched[2][0] - batched[0][0] == pytest.approx(20, abs=4)
    # other sizes: one call per size, boxes in each image's own pixels
    calls = facecrop.DETECTOR.calls
    mixed = facecrop.detect_boxes([images[0], photo, images[1]])
    assert facecrop.DETECTOR.calls - calls == 2
    assert np.allclose(mixed[0], batched[0], atol=0.5) and np.allclose(mixed[2], batched[1], atol=0.5)
    assert np.allclose(mixed[1], facecrop.face_box(photo), atol=0.5)


def test_channels_last_nets_find_the_same_boxes(photo):
    """The detector's R-Net and O-Net run channels_last (faster pooling); a stock MTCNN, all NCHW,
    finds the same boxes."""
    from facenet_pytorch import MTCNN
    images = [portrait(photo, shift) for shift in (0, -30, 30)]
    ours = facecrop.detect_boxes(images)
    mtcnn = facecrop.DETECTOR.mtcnn
    assert all(net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
               for net in (mtcnn.rnet, mtcnn.onet))
    stock = MTCNN(min_face_size=facecrop.MIN_FACE, select_largest=True, device="cpu")
    assert stock.rnet.conv1.weight.is_contiguous()
    small = [image.resize((192, 256), Image.BILINEAR) for image in images]
    reference, _ = stock.detect(small)
    for box, found in zip(ours, reference):
        assert found is not None
        expected = np.asarray(found[0], dtype=float) * 2  # the detection copy is half size
        assert np.allclose(box, expected, atol=0.05), (box, expected)


def test_box_resizes_run_on_one_thread_and_find_the_same_boxes(photo, monkeypatch):
    """facenet-pytorch's per-box resizes run on one thread while MTCNN runs (the image pyramid on
    all of them); the boxes are exactly those found without that, and everything is put back,
    also when detection fails."""
    from facenet_pytorch.models.utils import detect_face
    images = [portrait(photo, shift) for shift in (0, -30, 30)]
    stock_resize, threads, seen = detect_face.imresample, torch.get_num_threads(), []

    def spy(image, size):
        seen.append((len(image), tuple(size), torch.get_num_threads()))
        return stock_resize(image, size)
    monkeypatch.setattr(detect_face, "imresample", spy)
    ours = facecrop.detect_boxes(images)
    assert detect_face.imresample is spy and torch.get_num_threads() == threads
    boxes = [s for s in seen if s[1] in facecrop.BOX_SIZES]
    assert len(boxes) > 10 and all(s[0] == 1 and s[2] == 1 for s in boxes)
    assert all(s[0] == len(images) and s[2] == threads for s in seen if s[1] not in facecrop.BOX_SIZES)
    with monkeypatch.context() as m:
        m.setattr(facecrop, "box_resizes_on_one_thread", contextlib.nullcontext)
        assert facecrop.detect_boxes(images) == ours
        assert seen[-1][2] == threads  # unwrapped, the boxes were resized on every thread

    # a run the thread probe put on one compute thread: MTCNN still gets the process's own count
    monkeypatch.setattr(facecrop, "DETECT_THREADS", 2)
    torch.set_num_threads(1)
    start = len(seen)
    try:
        assert facecrop.detect_boxes(images) == ours and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    pyramid = [s[2] for s in seen[start:] if s[1] not in facecrop.BOX_SIZES]
    assert pyramid and set(pyramid) == {2} and all(s[2] == 1 for s in seen[start:] if s[1] in facecrop.BOX_SIZES)

    def broken(image, size):
        raise RuntimeError("boom")
    monkeypatch.setattr(detect_face, "imresample", broken)
    with pytest.raises(RuntimeError, match="boom"):
        facecrop.detect_boxes(images[:1])
    assert detect_face.imresample is broken and torch.get_num_threads() == threads


def test_cache_detects_only_new_or_changed_images(tmp_path, photo):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    names = ["a.jpg", "b.jpg", "c.png", "blank.png", "noise.png"]
    for shift, name in zip((0, -20, 20), names):
        portrait(photo, shift).save(root / "images" / name)
    Image.new("RGB", SIZE, (90, 90, 90)).save(root / "images" / "blank.png")
    noise(2).save(root / "images" / "noise.png")
    paths = [str(root / "images" / n) for n in names]

    sent = facecrop.DETECTOR.images
    first = facecrop.boxes_for(paths, str(root), progress=False)
    assert facecrop.DETECTOR.images - sent == 5 and first.detected == 5
    assert [b is None for b in first.boxes] == [False, False, False, True, True]
    assert first.fallbacks == 2 and first.sizes == [SIZE] * 5
    assert first.cache_path == os.path.join(str(root), ".face_boxes.csv")
    assert os.path.isfile(first.cache_path) and not any(".tmp" in n for n in os.listdir(root))
    assert "5 images, 3 faces, 2 fallbacks" in first.summary()

    sent = facecrop.DETECTOR.images
    second = facecrop.boxes_for(paths, str(root), progress=False)
    assert facecrop.DETECTOR.images == sent and second.detected == 0
    assert second.boxes == first.boxes and second.sizes == first.sizes
    assert second.regions() == first.regions() and second.regions()[3] == facecrop.crop_region(None, *SIZE)

    # a rewritten image, same name and same size: detected again, and only that one
    portrait(photo, -40, colour=(60, 120, 60)).save(root / "images" / "b.jpg")
    sent = facecrop.DETECTOR.images
    third = facecrop.boxes_for(paths, str(root), progress=False)
    assert facecrop.DETECTOR.images - sent == 1 and third.detected == 1
    assert third.boxes[1] != first.boxes[1] and third.boxes[1][0] < first.boxes[1][0]
    assert third.boxes[:1] + third.boxes[2:] == first.boxes[:1] + first.boxes[2:]

    # a cache elsewhere starts empty; the data folder's own cache is left as it was
    elsewhere = tmp_path / "boxes.csv"
    before = open(first.cache_path).read()
    fourth = facecrop.boxes_for(paths[:2], str(root), cache_path=str(elsewhere), progress=False)
    assert fourth.detected == 2 and fourth.boxes == third.boxes[:2] and elsewhere.is_file()
    assert open(first.cache_path).read() == before


def test_a_damaged_cache_is_detected_again(tmp_path, photo):
    root = tmp_path / "data"
    root.mkdir()
    portrait(photo).save(root / "face.png")
    cache = root / facecrop.CACHE_NAME
    cache.write_text("not,a\ncache")
    faces = facecrop.boxes_for([str(root / "face.png")], str(root), progress=False)
    assert faces.detected == 1 and faces.boxes[0] is not None
    assert cache.read_text().startswith(",".join(facecrop.CACHE_COLUMNS))


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_cli_fills_the_cache_and_previews(tmp_path, photo):
    data = tmp_path / "faces"
    (data / "sub").mkdir(parents=True)
    portrait(photo).save(data / "one.jpg")
    portrait(photo, 30).save(data / "sub" / "two.png")
    noise(3).save(data / "three.png")
    Image.new("RGB", SIZE, (20, 20, 20)).save(data / "four.jpg")

    result = run_cli("facecrop.py", "--data_dir", data, timeout=300)
    summary = [line for line in result.stdout.splitlines() if line.startswith("face boxes:")]
    assert summary and "4 images, 2 faces, 2 fallbacks" in summary[0], result.stdout
    cache = data / facecrop.CACHE_NAME
    assert cache.is_file() and len(cache.read_text().splitlines()) == 1 + 4

    out = tmp_path / "preview.png"
    result = run_cli("facecrop.py", "--data-dir", data, "--preview", 4, "--out", out, "--face_margin", 0.2,
                     timeout=300)
    assert "0 detected now" in result.stdout and str(out) in result.stdout
    with Image.open(out) as sheet:  # 2 x 2 tiles of 192x256 plus captions and a legend
        assert sheet.size[0] == 2 * facecrop.TILE[0] and 2 * facecrop.TILE[1] < sheet.size[1] < 3 * facecrop.TILE[1]


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_cli_reads_the_competition_layout(sample_data, tmp_path):
    cache = tmp_path / "boxes.csv"
    out = tmp_path / "sheet.png"
    result = run_cli("facecrop.py", "--data_dir", sample_data / "train", "--preview", 3, "--out", out,
                     "--cache", cache, timeout=300)
    assert "face boxes: 3 images" in result.stdout and out.is_file()
    rows = cache.read_text().splitlines()[1:]
    assert len(rows) == 3 and all(r.startswith("images/") for r in rows)
    assert not (sample_data / "train" / facecrop.CACHE_NAME).exists()


@pytest.mark.parametrize("args, expected", [
    (["--data_dir", "no/such/folder"], "data folder no/such/folder does not exist"),
    (["--data_dir", ".", "--face_margin", "-1"], "expected a number >= 0"),
])
def test_cli_user_errors_are_one_line(tmp_path, args, expected, run_here):
    one_line_error(run_here("facecrop.py", *args, cwd=tmp_path, check=False), expected)


def test_unwritable_cache_place_fails_before_detecting(tmp_path, photo):
    portrait(photo).save(tmp_path / "face.png")
    sent = facecrop.DETECTOR.images
    with pytest.raises(facecrop.UserError, match="cannot write the face box cache"):
        facecrop.boxes_for([str(tmp_path / "face.png")], str(tmp_path), progress=False,
                           cache_path=str(tmp_path / "no_such_folder" / "boxes.csv"))
    assert facecrop.DETECTOR.images == sent
