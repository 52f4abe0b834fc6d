"""Face crops: MTCNN face boxes (facenet-pytorch), their on-disk cache, the crop with a margin and
the central fallback used where no face is found.

- `face_box(image)` / `detect_boxes(images)`: the largest face in PIL images, in each image's own
  pixels, or None. Detection runs on a copy whose shorter side is DETECT_SIDE (see below).
- `crop_region(box, width, height, margin)`: the face box grown by the margin, clipped to the
  image; the fixed central region when box is None. `crop_image(image, region)` cuts it out.
- `boxes_for(paths, root)`: boxes for a whole data folder, cached in `<root>/.face_boxes.csv`
  (hidden, so the dataset readers skip it). Only new or changed images are detected again.

How train and inference use it (`--facecrop True`): train.py calls `boxes_for` once per data
folder, prints `faces.summary()` and hands `faces.regions(margin)` to the dataset, whose
`load_image(path, region=...)` crops each photo (regions are in full-size pixels, so a reduced
JPEG decode still crops the right place). inference.py does the same on the eval folder with
the margin stored in the run's config.json.

Examples:
    python facecrop.py --data_dir data/train                     # fill the cache, one summary line
    python facecrop.py --data_dir data/eval --preview 16 --out preview.png   # check the crops by eye
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import argparse
import contextlib
import csv
import hashlib
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from dataset import read_eval_dir, read_mask_train, resolve_train_dir
from maskcls import cli
from maskcls.atomic import replacing
from maskcls.cli import UserError
from maskcls.images import load_image
from maskcls.runtime import num_threads

FACE_MARGIN = 0.3  # grow the face box by this share of its width (left, right) and height (top, bottom)
# Detection runs on a copy whose shorter side is DETECT_SIDE px (never enlarged). On a 384x512
# photo that is half size: twice as fast as full size on a CPU (30 vs 14 images/s on one core),
# boxes within ~3 px (median) of the full-size ones, masked faces found as often; 128 px gains
# speed but its boxes wander further.
DETECT_SIDE = 192
MIN_FACE = 20     # px in the detection copy: MTCNN's smallest face (40 px on a 384x512 photo)
BATCH_SIZE = 16   # same-size images per MTCNN call: 8..16 were fastest on 2 cores, 50 slower
# Where no face is found: a centred region of this share of the width and height, its centre at
# this share of the height from the top (these portraits hold the face in the upper middle).
FALLBACK_WIDTH, FALLBACK_HEIGHT, FALLBACK_CENTER_Y = 0.6, 0.55, 0.42

CACHE_NAME = ".face_boxes.csv"  # hidden: every dataset reader skips names starting with '.'
CACHE_COLUMNS = ("path", "fingerprint", "width", "height", "x1", "y1", "x2", "y2", "detector")
# Rows written with other detection settings are detected again, never reused.
DETECTOR_TAG = f"mtcnn short_side={DETECT_SIDE} min_face={MIN_FACE}"


# ---------------------------------------------------------------- detection
class Detector:
    """The MTCNN detector, created on first use and reused, and counters the tests read."""

    def __init__(self):
        self.mtcnn = None
        self.calls = 0   # MTCNN calls so far
        self.images = 0  # images sent to MTCNN so far

    def __call__(self, images):
        """The largest face box (x1, y1, x2, y2) in each of `images` (same-size PIL images), or None."""
        if self.mtcnn is None:
            try:
                from facenet_pytorch import MTCNN
            except ImportError:
                raise UserError("face crop needs facenet-pytorch: pip install facenet-pytorch==2.5.3") from None
            # select_largest: the sitter is the largest face in a portrait, a face in the background smaller
            self.mtcnn = MTCNN(min_face_size=MIN_FACE, select_largest=True, device="cpu")
            # R-Net and O-Net run on every candidate box (~60 per photo) and spend most of their
            # time in NCHW max-pooling; with channels_last weights the convolutions hand the pools
            # NHWC maps and detection runs ~1.8x faster on 2 cores, the same boxes to 0.01 px.
            # P-Net's pyramid gained nothing from it (prelu on large NHWC maps is slower).
            for net in (self.mtcnn.rnet, self.mtcnn.onet):
                net.to(memory_format=torch.channels_last)
        self.calls += 1
        self.images += len(images)
        # a run on one compute thread (small inputs) still detects on all
        with num_threads(DETECT_THREADS), box_resizes_on_one_thread():
            boxes, _ = self.mtcnn.detect(list(images))
        return [None if found is None else [float(v) for v in found[0]] for found in boxes]


DETECTOR = Detector()
BOX_SIZES = ((24, 24), (48, 48))  # what R-Net and O-Net take
# The process's compute threads at import, before a run's thread probe (maskcls.runtime.probe_threads)
# may give its training one: detection on one thread took 1.3-1.5x as long (32 canvases, batches of 16).
DETECT_THREADS = torch.get_num_threads()


@contextlib.contextmanager
def box_resizes_on_one_thread():
    """While MTCNN runs, facenet-pytorch's per-box resize (each of ~60 candidate boxes a photo cut
    out and shrunk to R-Net's 24x24, then O-Net's 48x48 by an area interpolation, one call a box)
    runs on one thread. torch runs that op on all its threads at any size, and with OpenMP's
    passive waiting (set in maskcls) each call wakes the sleeping threads: 0.10-0.15 ms a box
    instead of 0.03-0.06 on one thread, 40% of a batched detection. The same op on the same
    pixels, so the same boxes; the image pyramid (whole batches) keeps every thread."""
    from facenet_pytorch.models.utils import detect_face
    resize = detect_face.imresample

    def one_box_one_thread(image, size):
        if len(image) != 1 or tuple(size) not in BOX_SIZES:
            return resize(image, size)
        with num_threads(1):
            return resize(image, size)
    detect_face.imresample = one_box_one_thread
    try:
        yield
    finally:
        detect_face.imresample = resize


def detect_boxes(images, batch_size=BATCH_SIZE):
    """One face box (x1, y1, x2, y2) per PIL image, in that image's pixels, or None (no face).

    Images of one size go to MTCNN together, `batch_size` at a time; each is first shrunk so its
    shorter side is DETECT_SIDE and the box scaled back.
    """
    boxes = [None] * len(images)
    by_size = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.size, []).append(i)
    for (width, height), indices in by_size.items():
        scale = min(1.0, DETECT_SIDE / min(width, height))
        small = (max(1, round(width * scale)), max(1, round(height * scale)))
        sx, sy = small[0] / width, small[1] / height
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch = [images[i].convert("RGB").resize(small, Image.BILINEAR) for i in chunk]
            for i, box in zip(chunk, DETECTOR(batch)):
                if box is not None:  # back to full size; a hundredth of a pixel is plenty
                    boxes[i] = (round(box[0] / sx, 2), round(box[1] / sy, 2),
                                round(box[2] / sx, 2), round(box[3] / sy, 2))
    return boxes


def face_box(image):
    """The largest face in one PIL image as (x1, y1, x2, y2) in its own pixels, before any
    margin; None when no face is found."""
    return detect_boxes([image])[0]


# ---------------------------------------------------------------- the crop
def crop_region(box, width, height, margin=FACE_MARGIN):
    """The pixel region (x1, y1, x2, y2) to crop from a `width` x `height` image, as ints.

    A face box grows by `margin` times the box's WIDTH on the left and on the right and by
    `margin` times its HEIGHT at the top and at the bottom, then is clipped to the image. With
    box None (no face) it is the fixed central region (FALLBACK_*). Never empty.
    """
    if box is None:
        half_w, half_h = FALLBACK_WIDTH * width / 2, FALLBACK_HEIGHT * height / 2
        center_x, center_y = width / 2, FALLBACK_CENTER_Y * height
        x1, y1, x2, y2 = center_x - half_w, center_y - half_h, center_x + half_w, center_y + half_h
    else:
        x1, y1, x2, y2 = box
        grow_x, grow_y = margin * (x2 - x1), margin * (y2 - y1)
        x1, y1, x2, y2 = x1 - grow_x, y1 - grow_y, x2 + grow_x, y2 + grow_y
    x1 = min(max(math.floor(x1), 0), width - 1)
    y1 = min(max(math.floor(y1), 0), height - 1)
    x2 = max(min(math.ceil(x2), width), x1 + 1)
    y2 = max(min(math.ceil(y2), height), y1 + 1)
    return x1, y1, x2, y2


def crop_image(image, region):
    """Cut `region` (x1, y1, x2, y2) out of a PIL image or an HxWxC array; returns an array."""
    array = np.asarray(image)
    x1, y1, x2, y2 = region
    assert 0 <= x1 < x2 <= array.shape[1] and 0 <= y1 < y2 <= array.shape[0], (
        f"crop region {region} is outside a {array.shape[1]}x{array.shape[0]} image "
        f"(a reduced decode? use images.load_image(path, region=...))")
    return array[y1:y2, x1:x2]


# ---------------------------------------------------------------- the cache
@dataclass
class CacheEntry:
    fingerprint: str
    size: tuple  # (width, height) of the upright image
    box: tuple   # (x1, y1, x2, y2), or None: no face


def fingerprint(path):
    """A hash of the file's bytes. Size and mtime would miss a file replaced by one of the same
    size with its time stamp kept (cp -p, rsync -a, unzip), and would change on every fresh copy
    of the same data. Hashing a 75 KB photo takes ~0.1 ms, detecting it ~20-30 ms."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err.strerror}") from None


def load_cache(cache_path):
    """{relative path: CacheEntry} from a cache file; {} if it is missing or unreadable."""
    if os.path.isdir(cache_path):
        raise UserError(f"face box cache {cache_path} is a folder; expected a file name")
    if not os.path.exists(cache_path):
        return {}
    entries, bad = {}, 0
    try:
        with open(cache_path, newline="") as f:
            for row in csv.DictReader(f):
                if row["detector"] != DETECTOR_TAG:
                    continue
                corners = [row[k] for k in ("x1", "y1", "x2", "y2")]
                box = None if not any(corners) else tuple(float(v) for v in corners)
                size = (int(row["width"]), int(row["height"]))
                if min(size) <= 0 or (box is not None and not all(map(math.isfinite, box))):
                    bad += 1  # an edited or damaged row: that image is detected again
                    continue
                entries[row["path"]] = CacheEntry(row["fingerprint"], size, box)
    except (OSError, KeyError, TypeError, ValueError, csv.Error, UnicodeDecodeError) as err:
        print(f"note: ignoring the unreadable face box cache {cache_path} ({err!r}); detecting again")
        return {}
    if bad:
        print(f"note: {bad} row(s) of {cache_path} hold no usable box (not finite, or an empty image size); "
              f"those images are detected again")
    return entries


def save_cache(cache_path, entries):
    """Write the cache to a temporary file, then rename it: a crash never leaves half a file."""
    try:
        with replacing(cache_path) as temp, open(temp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CACHE_COLUMNS)
            for key in sorted(entries):
                entry = entries[key]
                writer.writerow([key, entry.fingerprint, *entry.size, *(entry.box or ("",) * 4), DETECTOR_TAG])
    except OSError as err:
        raise UserError(f"cannot write the face box cache {cache_path}: {err.strerror}") from None


@dataclass
class FaceBoxes:
    """What `boxes_for` found: one box (or None: no face) and one (width, height) per path."""
    boxes: list
    sizes: list
    detected: int     # images run through the detector this time; the rest came from the cache
    seconds: float
    cache_path: str

    @property
    def fallbacks(self):
        return sum(box is None for box in self.boxes)

    def regions(self, margin=FACE_MARGIN):
        """The crop region of every image (`crop_region`), in full-size pixels."""
        return [crop_region(box, w, h, margin) for box, (w, h) in zip(self.boxes, self.sizes)]

    def summary(self):
        return (f"face boxes: {len(self.boxes)} images, {len(self.boxes) - self.fallbacks} faces, "
                f"{self.fallbacks} fallbacks (central crop); {self.detected} detected now in "
                f"{self.seconds:.1f}s; cache {self.cache_path}")


def _cache_key(path, root):
    return os.path.relpath(path, root).replace(os.sep, "/")


def boxes_for(paths, root, cache_path=None, progress=True, batch_size=BATCH_SIZE):
    """Face boxes for image `paths` (as you would open them) under the data folder `root`.

    The cache (default `<root>/.face_boxes.csv`) is keyed on the path relative to `root` plus a
    hash of the file's bytes: a new or rewritten image is detected again, the rest are read
    back. New boxes are added to the cache, written atomically, even if detection is
    interrupted half-way. Returns a `FaceBoxes`.
    """
    start = time.time()
    root = os.path.normpath(root)
    cache_path = cache_path or os.path.join(root, CACHE_NAME)
    keys = [_cache_key(p, root) for p in paths]
    entries = load_cache(cache_path)
    hashes = [fingerprint(p) for p in paths]
    todo = [i for i, (key, digest) in enumerate(zip(keys, hashes))
            if key not in entries or entries[key].fingerprint != digest]
    folder = os.path.dirname(os.path.abspath(cache_path))
    if todo and not os.access(folder, os.W_OK):  # say so now, not after the detection
        raise UserError(f"cannot write the face box cache {cache_path}: folder {folder} is missing or read-only; "
                        f"give another cache path")
    window = 4 * batch_size  # images held in memory at once
    try:
        with cli.progress(total=len(todo), desc="face boxes", unit="img", disable=not progress or not todo) as bar:
            for start_at in range(0, len(todo), window):
                chunk = todo[start_at:start_at + window]
                images = [Image.fromarray(load_image(paths[i])) for i in chunk]
                for i, image, box in zip(chunk, images, detect_boxes(images, batch_size)):
                    entries[keys[i]] = CacheEntry(hashes[i], image.size, box)
                bar.update(len(chunk))
    finally:  # keep what was detected, also after Ctrl-C or an unreadable image
        if todo:
            save_cache(cache_path, entries)
    return FaceBoxes([entries[k].box for k in keys], [entries[k].size for k in keys],
                     len(todo), time.time() - start, cache_path)


def face_regions(paths, root, margin=FACE_MARGIN, cache_path=None):
    """What train.py and inference.py call: the face crop region of every image (full-size
    pixels), detecting only what the cache under `root` lacks; prints one summary line."""
    faces = boxes_for(paths, root, cache_path)
    print(faces.summary(), flush=True)
    return faces.regions(margin)


# ---------------------------------------------------------------- the CLI
FACE_COLOUR, CROP_COLOUR, FALLBACK_COLOUR = (0, 230, 0), (255, 200, 0), (255, 0, 60)
TILE = (192, 256)  # preview tile (width, height) in px: half a competition photo
CAPTION = 14       # px below each tile for its name


def dataset_images(data_dir):
    """(root, image paths relative to root) for the competition train layout, the eval layout
    (info.csv + images/) or any folder of images."""
    if not os.path.isdir(data_dir):
        raise UserError(f"data folder {data_dir} does not exist")
    root = resolve_train_dir(data_dir)
    if os.path.isfile(os.path.join(root, "train.csv")):
        root, samples = read_mask_train(root)
        return root, [s.path for s in samples]
    root = os.path.normpath(data_dir)
    return root, [_cache_key(p, root) for p in read_eval_dir(root).paths]


def write_preview(out, paths, faces, margin, root):
    """A contact sheet: each image with its face box (green) and crop region (yellow), or the
    central fallback region (red) where no face was found."""
    columns = math.ceil(math.sqrt(len(paths)))
    rows = math.ceil(len(paths) / columns)
    legend = 18
    sheet = Image.new("RGB", (columns * TILE[0], legend + rows * (TILE[1] + CAPTION)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), f"green: face box   yellow: crop (margin {margin})   red: no face, central crop",
              fill=(255, 255, 255))
    for n, (path, box, (width, height)) in enumerate(zip(paths, faces.boxes, faces.sizes)):
        thumb = ImageOps.contain(Image.fromarray(load_image(path)), TILE)
        scale = thumb.width / width
        left, top = n % columns * TILE[0], legend + n // columns * (TILE[1] + CAPTION)
        sheet.paste(thumb, (left, top))
        region = crop_region(box, width, height, margin)

        def to_sheet(r):
            return [left + r[0] * scale, top + r[1] * scale, left + r[2] * scale, top + r[3] * scale]
        draw.rectangle(to_sheet(region), outline=CROP_COLOUR if box else FALLBACK_COLOUR, width=2)
        if box:
            draw.rectangle(to_sheet(box), outline=FACE_COLOUR, width=2)
        name = os.path.relpath(path, root)
        name = name if len(name) <= 30 else ".." + name[-28:]
        draw.text((left + 2, top + TILE[1] + 1), name, fill=(255, 255, 255) if box else FALLBACK_COLOUR)
    try:
        sheet.save(out)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot write the preview {out}: {err}") from None


def non_negative(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def get_args_parser():
    parser = cli.ArgumentParser(description="Precompute the face boxes of a data folder, or preview the crops.",
                                epilog="Every flag also has a kebab-case spelling (--face-margin).")
    parser.add_argument("--data_dir", required=True,
                        help="competition train (train.csv + images/) or eval (info.csv + images/) folder, "
                             "or any folder of images")
    parser.add_argument("--cache", default=None, help=f"the box cache file; default: DATA_DIR/{CACHE_NAME}")
    parser.add_argument("--face_margin", type=non_negative, default=FACE_MARGIN,
                        help="grow the face box by this share of its width/height on each side")
    parser.add_argument("--preview", type=cli.positive_int, default=None, metavar="N",
                        help="only N evenly spaced images, drawn into a contact sheet (--out)")
    parser.add_argument("--out", default="facecrop_preview.png", help="the preview PNG")
    return parser


def main(args):
    root, rel_paths = dataset_images(args.data_dir)
    if args.preview:
        picks = np.unique(np.linspace(0, len(rel_paths) - 1, min(args.preview, len(rel_paths))).round())
        rel_paths = [rel_paths[int(i)] for i in picks]
        out_folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_folder):
            raise UserError(f"cannot write the preview {args.out}: folder {out_folder} does not exist")
    paths = [os.path.join(root, p) for p in rel_paths]
    faces = boxes_for(paths, root, args.cache)
    print(faces.summary())
    if args.preview:
        write_preview(args.out, paths, faces, args.face_margin, root)
        print(f"preview of {len(paths)} images: {args.out}")
    return faces


if __name__ == "__main__":
    cli.run(main, get_args_parser)
